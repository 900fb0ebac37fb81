"""StableDiffusionGenerator(tiny_vae=FOLDER): an AutoencoderTiny (TAESD-like) decodes the latents
instead of the model's VAE, loaded with from_pretrained from a local folder; refused for modes
that encode images, and recorded in every record's provenance."""

import numpy as np
import pytest

from synthaug import load_generator


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    # two blocks: one upsampling step, the tiny SD pipeline's VAE scale factor (2)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                          num_decoder_blocks=(1, 1), latent_channels=4)
    folder = tmp_path_factory.mktemp("taesd")
    vae.save_pretrained(folder)
    return folder


def test_tiny_vae_decodes_and_is_recorded(tiny_sd_dir, tiny_taesd):
    kw = dict(prompt="a photo of a shirt", label=0, num_inference_steps=2, device="cpu", batch_size=2)
    full = load_generator(str(tiny_sd_dir), **kw)
    tiny = load_generator(str(tiny_sd_dir), tiny_vae=str(tiny_taesd), **kw)
    assert type(tiny.pipe.vae).__name__ == "AutoencoderTiny" and type(full.pipe.vae).__name__ == "AutoencoderKL"
    a, b = full.generate(2, seed=5), tiny.generate(2, seed=5)
    assert b.images.shape == a.images.shape and b.images.dtype == np.uint8
    assert not np.array_equal(a.images, b.images)  # another decoder
    assert np.array_equal(tiny.generate(2, seed=5).images, b.images)  # deterministic per seed
    assert b.meta[0]["overrides"]["tiny_vae"] == str(tiny_taesd) and "tiny_vae" not in a.meta[0]["overrides"]
    full.close()
    tiny.close()


def test_tiny_vae_refused_where_it_cannot_work(tiny_sd_dir, tiny_taesd, tmp_path):
    with pytest.raises(ValueError, match="tiny_vae decodes txt2img latents"):
        load_generator(str(tiny_sd_dir), prompt="a photo", label=0, tiny_vae=str(tiny_taesd), mode="img2img",
                       source_images=[np.zeros((32, 32, 3), np.uint8)], device="cpu")
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderTiny folder"):
        load_generator(str(tiny_sd_dir), prompt="a photo", label=0, tiny_vae=str(tmp_path), device="cpu")
