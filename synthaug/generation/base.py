"""The generator contract shared by every backend (``load_generator`` is in :mod:`synthaug.generation.loading`).

A generator turns ``(n, seed)`` into ``n`` images with labels and per-image provenance:

* Image ``i`` of ``generate(n, seed)`` uses the per-image seed ``seed + i``; its initial noise
  comes from a CPU ``torch.Generator`` seeded with it, and every per-image choice (the source
  image, the strength drawn from a set of strengths) is a function of it. So ``generate(1, seed + i)``
  reproduces image ``i``, the internal batch size does not change what is made, and a record's
  ``meta["seed"]`` is all ``synthaug generate --seed`` needs to make it again (same device and dtype).
* ``spec`` is a JSON-serializable dict; :func:`~synthaug.generation.loading.generator_from_spec` rebuilds an equivalent
  generator in another process (the GenerationWorker does exactly that).
* A label is a class index, a list of class indices (multi-label) or a
  :class:`~synthaug.cache.codec.SoftLabel` (``{class index: weight}``, first entry the class the
  image was made for; translate mode with ``soft_label_gamma``).

Modes (:mod:`synthaug.generation.modes`): ``"txt2img"`` (from noise), ``"img2img"`` (SDEdit from
real images of the class), ``"translate"`` (SDEdit from real images of *other* classes into the
generator's class, Diff-Mix style) and ``"feedback"`` (pixel DDPM only: from noise, steered by a
reference classifier's gradient toward images it finds hard).

Per-image ``meta`` holds at least: ``source`` and ``overrides`` (the spec), ``model`` (base
model ref), ``adapter`` and ``adapter_hash`` (or ``None``), ``backend``, ``mode``, ``seed``,
``prompt``, ``negative_prompt``, ``label``, ``label_name``, ``scheduler``, ``num_inference_steps``,
``guidance_scale``, ``resolution`` (``[H, W]`` of the stored image), ``device``, ``dtype``; and by mode:

* img2img: ``strength`` (this image's, drawn from the set when ``strength`` is a list),
  ``source_image`` (SHA-256 of the source image's pixels, :func:`synthaug.adapter.image_sha256`)
  and ``source_index`` (its position among the sources);
* translate: the same three, plus ``source_class`` (the source image's class index in the
  generator's label space), ``source_class_name`` (its name, or ``None``) and
  ``soft_label_gamma`` (``None``: the record has the hard label ``label``; else ``g`` and the
  label ``{label: s**g, source_class: 1 - s**g}`` for strength ``s``);
* feedback: ``feedback_objective`` (``"entropy"`` or ``"loss"``), ``feedback_scale``,
  ``feedback_classifier`` (the reference classifier's path) and ``feedback_classifier_sha256``
  (its file's SHA-256).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from synthaug.cache.codec import SoftLabel, as_labels

__all__ = [
    "GeneratedBatch",
    "Generator",
    "default_device",
    "default_dtype",
    "dtype_kwargs",
    "per_image_seeds",
]

Label = Union[int, Sequence[int], SoftLabel]


@dataclass
class GeneratedBatch:
    """What ``Generator.generate`` returns.

    Attributes:
        images: uint8 numpy array N×H×W×C (C = 1 or 3).
        labels: one label per image: a class index, a list of class indices (multi-label) or a
            :class:`~synthaug.cache.codec.SoftLabel` (``{class index: weight}``).
        meta: one provenance dict per image (see the module docstring).
    """

    images: np.ndarray
    labels: List[Label]
    meta: List[Dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"GeneratedBatch.images must be uint8 N×H×W×C, got {self.images.dtype} {self.images.shape}")
        if not (len(self.labels) == len(self.images) == len(self.meta)):
            raise ValueError(f"GeneratedBatch has {len(self.images)} images, {len(self.labels)} labels, {len(self.meta)} meta dicts")
        as_labels(self.labels, len(self.images))  # each one a label the cache can store (ValueError naming it if not)


def per_image_seeds(n: int, seed: int) -> List[int]:
    """The per-image seeds of ``generate(n, seed)``: ``seed, seed + 1, ..., seed + n - 1``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0 or seed + n > 2**63:
        raise ValueError(f"seed must be in [0, 2**63 - n], got {seed}")
    return [seed + i for i in range(n)]


def default_device(device: Optional[str] = None) -> str:
    """``device`` if given, else ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str, dtype: Optional[str] = None):
    """torch dtype: ``dtype`` if given (``"fp32"|"fp16"|"bf16"`` or torch names), else fp16 on
    CUDA and fp32 elsewhere (half precision on CPU is slow and inexact)."""
    import torch

    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }
    if dtype is None or dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return names[key]


def dtype_kwargs(dtype) -> Dict[str, Any]:
    """The ``from_pretrained`` keyword for a torch dtype: ``dtype`` in diffusers versions that
    deprecate ``torch_dtype`` (0.42+), ``torch_dtype`` in older ones (feature-detected)."""
    try:
        from diffusers.utils import deprecation_utils

        new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    except ImportError:  # pragma: no cover - very old diffusers
        new = False
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


class Generator(abc.ABC):
    """A source of synthetic images. Subclasses implement :meth:`generate` and :attr:`spec`."""

    #: label names of the label space the generator's labels index (``None`` if unknown)
    label_names: Optional[List[str]] = None

    @property
    @abc.abstractmethod
    def spec(self) -> Dict[str, Any]:
        """``{"source": str, "overrides": {...}}`` plus descriptive keys; JSON-serializable."""

    @abc.abstractmethod
    def generate(self, n: int, seed: int) -> GeneratedBatch:
        """``n`` images; image ``i`` made from per-image seed ``seed + i``."""

    def close(self) -> None:
        """Release models and memory (optional)."""

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
