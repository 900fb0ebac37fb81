"""Models shipped inside the package, addressed as ``builtin:<name>``.

``fashion-mnist-ddpm``: a class-conditional pixel-space DDPM (diffusers ``UNet2DModel``, 32×32
gray, 1.06 M parameters) pretrained by this project on Fashion-MNIST's nine non-rare classes;
the rare class ("Shirt") has an embedding slot but never saw an image. Trained by
:mod:`synthaug.builtin.train_fashion_mnist_ddpm`; its log and sample grid are in its folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

__all__ = ["BUILTIN_PREFIX", "available_builtins", "resolve_builtin"]

BUILTIN_PREFIX = "builtin:"
_HERE = Path(__file__).resolve().parent


def available_builtins() -> Dict[str, Path]:
    """``{name: folder}`` of the shipped models (folders holding ``synthaug_model.json``)."""
    return {p.name: p for p in sorted(_HERE.iterdir()) if (p / "synthaug_model.json").is_file()}


def resolve_builtin(ref: str) -> Path:
    """The folder of ``builtin:<name>`` (or a bare name).

    Raises:
        ValueError: unknown name, listing the available ones.
    """
    name = ref[len(BUILTIN_PREFIX):] if ref.startswith(BUILTIN_PREFIX) else ref
    models = available_builtins()
    if name not in models:
        known = ", ".join(BUILTIN_PREFIX + n for n in models) or "(none installed)"
        raise ValueError(f"unknown built-in model {ref!r}; available: {known}")
    return models[name]
