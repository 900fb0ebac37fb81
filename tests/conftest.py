"""Shared fixtures: tiny random-weight models written once per test session (see
``tests/helpers/tiny_sd.py``)."""

import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny Stable-Diffusion-1.x pipeline folder (32×32 RGB images), loaded by the real
    ``from_pretrained`` path."""
    from tests.helpers.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sd_adapter(tiny_sd_dir, tmp_path_factory):
    """A synthaug adapter (diffusers-format LoRA + synthaug.json) on ``tiny_sd_dir``: prompt
    "a photo of sks shirt", label 6 ("Shirt"), 4 steps, guidance 2."""
    from tests.helpers.tiny_sd import write_tiny_sd_lora_adapter

    return write_tiny_sd_lora_adapter(tiny_sd_dir, tmp_path_factory.mktemp("tiny-sd-adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_ddpm_dir(tmp_path_factory):
    """A tiny class-conditional pixel-DDPM folder (12×12 gray images, classes a, b, c)."""
    from tests.helpers.tiny_sd import write_tiny_pixel_ddpm

    return write_tiny_pixel_ddpm(tmp_path_factory.mktemp("tiny-ddpm") / "model")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``): on
    a small shared machine, OpenMP threads of two busy processes spin against each other and make
    every operator ~100× slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
