"""``load_generator``: a :class:`~synthaug.generation.base.Generator` from a model source, and
``generator_from_spec``: the same generator rebuilt in another process from its ``spec``.

What a source names is decided in :mod:`synthaug.generation.sources`; this module picks the
backend for it.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Union

from synthaug.generation.base import Generator
from synthaug.generation.ddpm import PixelDDPMGenerator
from synthaug.generation.sd import StableDiffusionGenerator
from synthaug.generation.sources import resolve_source

__all__ = ["generator_from_spec", "load_generator"]


def generator_from_spec(spec: Dict[str, Any]) -> Generator:
    """Rebuild a generator from its ``spec`` (e.g. in a worker process).

    A spec is ``{"source": ..., "overrides": {...}}`` (:func:`load_generator` arguments). A
    generator class of your own can travel to a worker too: give its spec a ``"factory"`` key,
    ``"package.module:callable"``, and the callable is imported and called with ``overrides``.
    """
    if not isinstance(spec, dict) or not ("source" in spec or "factory" in spec):
        raise ValueError(f"a generator spec is a dict with 'source' (or 'factory') and 'overrides', got {spec!r}")
    overrides = dict(spec.get("overrides") or {})
    if spec.get("factory"):
        module_name, _, attr = str(spec["factory"]).partition(":")
        if not module_name or not attr:
            raise ValueError(f"spec factory must be 'package.module:callable', got {spec['factory']!r}")
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
        return factory(**overrides)
    return load_generator(spec["source"], **overrides)


def load_generator(source: Union[str, os.PathLike], **overrides: Any) -> Generator:
    """A generator for ``source``.

    ``source`` is one of:

    * a synthaug adapter directory (holds ``synthaug.json``, written by ``synthaug finetune``):
      the base model it names with the LoRA applied, and its prompt/label as defaults;
    * ``builtin:<name>``: a model shipped in the package (e.g. ``builtin:fashion-mnist-ddpm``);
    * a pixel-DDPM folder (holds ``synthaug_model.json``);
    * a diffusers pipeline folder (holds ``model_index.json``) or a Hugging Face hub id of a
      Stable-Diffusion-family model (SD 1.x/2.x/SDXL).

    ``overrides`` are backend settings: ``prompt``, ``negative_prompt``, ``height``, ``width``,
    ``num_inference_steps``, ``guidance_scale``, ``scheduler``, ``label``, ``batch_size``,
    ``device``, ``dtype``, and ``mode`` with its settings: ``"img2img"``: ``source_images``,
    ``strength`` (a float or a list of floats, one drawn per image); ``"translate"``: the same plus
    ``source_classes`` and ``soft_label_gamma``; ``"feedback"`` (pixel DDPM only):
    ``feedback_classifier``, ``feedback_scale``, ``feedback_objective`` (see the backends'
    docstrings and :mod:`synthaug.generation.modes`). Unknown keys raise ``TypeError`` naming them.

    Raises:
        FileNotFoundError: a path that does not exist, or an adapter whose base model is missing.
        ValueError: an unknown ``builtin:`` name, or a folder that is none of the above.
    """
    src = resolve_source(source)
    if src.backend == "pixel-ddpm":
        return PixelDDPMGenerator(src.path, model_ref=src.ref, adapter=src.adapter, **overrides)
    return StableDiffusionGenerator(src.ref, adapter=src.adapter, **overrides)
