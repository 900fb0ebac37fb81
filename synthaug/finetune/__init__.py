"""LoRA fine-tuning on 20–50 real images: ``finetune_lora`` and ``synthaug finetune``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from synthaug.finetune.common import FinetuneConfig, load_training_images, prepare_output_dir
from synthaug.finetune.ddpm import finetune_pixel_ddpm, resolve_class
from synthaug.finetune.sd import check_settings, finetune_stable_diffusion
from synthaug.generation.sources import resolve_source

__all__ = ["FinetuneConfig", "finetune_lora"]


def finetune_lora(
    model: Union[str, os.PathLike],
    images: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    config: Optional[FinetuneConfig] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings,
) -> Path:
    """Train a LoRA adapter on the images of one class and write a synthaug adapter folder.

    Args:
        model: the base model: a diffusers Stable-Diffusion-family folder or hub id (needs
            ``prompt=``), or ``builtin:<name>`` / a pixel-DDPM folder (class-conditional: your
            class is ``class_name=``, a class of the model or your own, which then trains a
            free conditioning slot; default: the model's rare class). ``label=`` is the class's
            index in *your* classifier; ``label_names=`` your classes in label order.
        images: a folder of the real training images (PNG/JPEG/...; 20–50 intended).
        out: the adapter folder to write (see :mod:`synthaug.adapter` for its layout).
        config: a :class:`FinetuneConfig`; or pass its fields as keyword ``settings``
            (``rank``, ``lr``, ``steps``, ``batch_size``, ``resolution``, ``prompt``, ...).
        resume: continue from the newest checkpoint in ``out``.
        overwrite: replace whatever ``out`` holds.
        progress: show a progress bar with the loss.

    Returns:
        ``out``, ready for ``synthaug.load_generator(out)``.
    """
    if config is not None and settings:
        raise TypeError("pass either config= or individual settings, not both")
    cfg = config or FinetuneConfig.from_kwargs(**settings)
    cfg.check()
    source = resolve_source(model, adapters=False, what="model")
    train = load_training_images(images, min_images=cfg.min_images)  # checked before `out` is touched
    if source.backend == "pixel-ddpm":
        resolve_class(source, cfg)
    else:
        check_settings(source, cfg)
    out = prepare_output_dir(out, resume=resume, overwrite=overwrite)
    if source.backend == "pixel-ddpm":
        return finetune_pixel_ddpm(source, train, out, cfg, resume=resume, progress=progress)
    return finetune_stable_diffusion(source, train, out, cfg, resume=resume, progress=progress)
