"""What a model source names: the one place that tells a built-in model, a pixel-DDPM folder, a
diffusers pipeline folder, a Hugging Face hub id and a synthaug adapter apart.

``load_generator`` (generation) and ``finetune_lora`` (fine-tuning) both start here, so a source
that one accepts the other reads the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from synthaug.adapter import is_adapter_dir, read_adapter_config
from synthaug.builtin import BUILTIN_PREFIX, resolve_builtin

__all__ = ["ModelSource", "looks_like_hub_id", "resolve_source"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved source: its backend, the base model as provenance names it, where the base
    model lies, and the adapter applied to it (``None`` for a bare model).

    ``ref`` is the base model as the user (or the adapter's ``synthaug.json``) named it:
    ``builtin:...``, a folder or a hub id. ``path`` is its folder (a ``Path``), or the hub id for a
    Stable-Diffusion model not on disk.
    """

    backend: str  # "pixel-ddpm" | "stable-diffusion"
    ref: str
    path: Union[Path, str]
    adapter: Optional[Path] = None


_HUB_ID_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` (letters, digits, ``.``, ``_``, ``-``; not starting with ``.``, ``/`` or ``~``)
    that is not a path: a missing ``runs/adapter`` next to a local ``runs/`` folder is a missing
    folder, not a hub id; ``runwayml/stable-diffusion-v1-5`` without a ``runwayml/`` folder is one."""
    parts = ref.split("/")
    return len(parts) == 2 and all(_HUB_ID_PART.match(p) for p in parts) and not Path(parts[0]).is_dir()


def resolve_source(source: Union[str, os.PathLike], *, adapters: bool = True, what: str = "model source") -> ModelSource:
    """Which backend, base model and adapter ``source`` names.

    ``source`` is ``builtin:<name>``, a pixel-DDPM folder (``synthaug_model.json``), a diffusers
    pipeline folder (``model_index.json``), a hub id (``org/name``) or, with ``adapters``, a
    synthaug adapter folder (``synthaug.json``), which resolves to its base model with the
    adapter applied. ``what`` names the source in error messages (e.g. ``"model"``).

    Raises:
        FileNotFoundError: a path that does not exist and is no hub id, or an adapter whose
            pixel-DDPM base model is missing.
        ValueError: an unknown ``builtin:`` name, a file, a folder that is no model (or an
            adapter where ``adapters`` is false).
    """
    ref = str(source)
    if ref.startswith(BUILTIN_PREFIX):
        return ModelSource("pixel-ddpm", ref, resolve_builtin(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        if is_adapter_dir(path):
            if not adapters:
                raise ValueError(f"{path} is a synthaug adapter; fine-tune its base model instead (see its synthaug.json)")
            cfg = read_adapter_config(path)
            base = cfg["base_model"]
            if cfg["backend"] != "pixel-ddpm":
                return ModelSource("stable-diffusion", base, base, path)
            folder = resolve_builtin(base) if base.startswith(BUILTIN_PREFIX) else Path(base)
            if not folder.is_dir():
                raise FileNotFoundError(f"adapter {path} needs its base model {base}, which does not exist")
            return ModelSource("pixel-ddpm", base, folder, path)
        if (path / "synthaug_model.json").is_file():
            return ModelSource("pixel-ddpm", ref, path)
        if (path / "model_index.json").is_file():
            return ModelSource("stable-diffusion", ref, path)
        if adapters:
            raise ValueError(
                f"{path} is not a synthaug adapter (synthaug.json), a pixel-DDPM folder (synthaug_model.json) "
                "or a diffusers pipeline folder (model_index.json)"
            )
        raise ValueError(f"{path} is not a model folder (no model_index.json or synthaug_model.json)")
    if path.exists():
        give = "a model or adapter folder" if adapters else "a model folder"
        raise ValueError(f"{what} {path} is a file; give {give}, a hub id, or builtin:<name>")
    if looks_like_hub_id(ref):
        return ModelSource("stable-diffusion", ref, ref)
    raise FileNotFoundError(f"{what} {ref} does not exist (no such folder){_not_a_hub_id(ref)}")


def _not_a_hub_id(ref: str) -> str:
    """Why a missing ``ref`` was not read as a hub id, where the reader might have meant one."""
    parts = ref.split("/")
    if len(parts) == 2 and all(_HUB_ID_PART.match(p) for p in parts):
        return f"; with a local folder {parts[0]}/ here it names a path, not the hub id {ref}"
    if "/" in ref or os.sep in ref or ref.startswith((".", "~")):
        return ""
    return ", and it is not a hub id (org/name) or builtin:<name>"
