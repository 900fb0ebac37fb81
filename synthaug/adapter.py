"""The synthaug adapter directory: what ``synthaug finetune`` writes and ``load_generator`` reads.

Layout::

    ADAPTER_DIR/
      synthaug.json                       settings and provenance (schema below)
      pytorch_lora_weights.safetensors    LoRA weights; for Stable-Diffusion models in diffusers'
                                          format, so ``pipe.load_lora_weights(ADAPTER_DIR)`` works
      validation.png, loss.png            made during training
      checkpoints/                        resumable training state (``--resume``)

``synthaug.json`` keys (``ADAPTER_SCHEMA_VERSION`` 1):

* ``synthaug_adapter``: schema version; ``backend``: ``"stable-diffusion"`` or ``"pixel-ddpm"``
* ``base_model``: what the LoRA was trained on (folder, hub id, or ``builtin:<name>``)
* ``weights``: file name of the LoRA weights; ``adapter_hash``: ``"sha256:<hex>"`` of that file
* ``prompt``, ``negative_prompt`` (text models); ``label`` (int, the class index the images get in
  the user's classifier's label space), ``class_name`` (the user's name of the class) and
  ``label_names`` (the user's label space by index, ``""`` where unnamed; ``None``: the base
  model's classes are the label space)
* pixel DDPM: ``model_class`` (the base model's conditioning slot the LoRA trained),
  ``model_class_name`` (the model's name for it; ``None`` for a slot the adapter added) and
  ``class_embeds`` (rows of the class-embedding table, larger than the base model's when a slot
  was added)
* ``resolution``; ``lora``: ``{"rank", "alpha", "target_modules"}``;
  ``training``: steps, lr, batch size, seed, mixed precision, ``final_loss`` (mean of the last
  ``final_loss_window`` steps' losses, as the progress bar shows), wall time
* ``train_images``: ``[{"file": name, "sha256": hex}]`` — the leakage guard: evaluation refuses a
  test set holding any of these images (hash of the decoded pixels, see :func:`image_sha256`)
* ``generation``: default generation settings (``num_inference_steps``, ``guidance_scale``,
  ``scheduler``), overridable in ``load_generator``
* ``created_at``, ``synthaug_version``
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np

from synthaug.imaging import to_hwc_uint8
from synthaug.outputs import write_json
from synthaug.version import __version__

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_SCHEMA_VERSION",
    "ADAPTER_WEIGHTS",
    "BACKENDS",
    "file_sha256",
    "image_sha256",
    "is_adapter_dir",
    "read_adapter_config",
    "write_adapter_config",
]

ADAPTER_CONFIG = "synthaug.json"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_SCHEMA_VERSION = 1
BACKENDS = ("stable-diffusion", "pixel-ddpm")
_REQUIRED = ("synthaug_adapter", "backend", "base_model", "weights")


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """``"sha256:<hex>"`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def image_sha256(image) -> str:
    """Hex SHA-256 of an image's decoded pixels (uint8, shape included), so the same picture
    stored as PNG or JPEG-decoded-then-PNG, or read from an IDX file, hashes alike."""
    arr = np.ascontiguousarray(to_hwc_uint8(image))
    h = hashlib.sha256()
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def is_adapter_dir(path: Union[str, os.PathLike]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: Union[str, os.PathLike], *, require_weights: bool = True) -> Dict[str, Any]:
    """The checked ``synthaug.json`` of an adapter directory.

    ``require_weights=False`` for readers that need only the JSON (e.g. the leakage guard and
    quality reports, which read the training-image hashes).

    Raises:
        FileNotFoundError: no such directory, or it holds no ``synthaug.json`` or no weights file.
        ValueError: the JSON is malformed, lacks a required key, or names an unknown backend.
    """
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not a synthaug adapter directory (no {ADAPTER_CONFIG}); make one with `synthaug finetune`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} lacks {', '.join(missing)}; it was not written by `synthaug finetune`")
    if cfg["synthaug_adapter"] > ADAPTER_SCHEMA_VERSION:
        raise ValueError(f"{cfg_path} has schema version {cfg['synthaug_adapter']}, newer than this synthaug; upgrade synthaug")
    if cfg["backend"] not in BACKENDS:
        raise ValueError(f"{cfg_path} names unknown backend {cfg['backend']!r}; expected one of {BACKENDS}")
    if require_weights and not (path / cfg["weights"]).is_file():
        raise FileNotFoundError(f"adapter {path} lacks its weights file {cfg['weights']}")
    return cfg


def write_adapter_config(path: Union[str, os.PathLike], config: Dict[str, Any]) -> Path:
    """Write ``synthaug.json`` atomically (adds schema version, time and synthaug version)."""
    from datetime import datetime, timezone

    path = Path(path)
    cfg = {"synthaug_adapter": ADAPTER_SCHEMA_VERSION, **config}
    cfg.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    cfg.setdefault("synthaug_version", __version__)
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"adapter config lacks {', '.join(missing)}")
    return write_json(path / ADAPTER_CONFIG, cfg)
