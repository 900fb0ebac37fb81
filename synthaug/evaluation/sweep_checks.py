"""What a sweep checks before it writes or trains anything, and the warnings of a run too small to mean much.

:func:`preflight` runs after the data set is loaded and before the sweep's folder is written, so
a mistake costs seconds and leaves nothing that blocks the corrected rerun:

* every seed's split can be drawn (``--shots``, ``--per-class`` and the validation draw against
  the images each class has);
* set sizes no larger than the synthetic pool (``--synthetic-images``, or the given cache's
  records of the rare class);
* a given ``--cache``: every record's class (by name when the cache names its labels) is one of
  the data set's, and some are of the rare class;
* the adapter's (or the base model's) image size and channels against the study's: a warning
  naming both, refused with ``--strict``;
* the size of the comparison: under :data:`MIN_STEPS` optimizer steps per arm, under
  :data:`MIN_RARE_TEST` rare test images, or a single seed give a "too small to compare arms"
  warning that the log and ``summary.md`` carry beside the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from synthaug.data.study import StudyData

__all__ = ["MIN_RARE_TEST", "MIN_STEPS", "preflight", "rare_test_support"]

MIN_STEPS = 100
MIN_RARE_TEST = 20


def preflight(cfg, data: StudyData, test_indices: Optional[Sequence[int]], *, steps_of) -> Dict[str, Any]:
    """Check the sweep ``cfg`` against ``data`` before anything is written or trained.

    Args:
        test_indices: the evaluated test images (``None``: all of them).
        steps_of: ``n_real_train -> optimizer steps per arm`` (the sweep's rule).

    Returns:
        ``{"warnings": [...], "too_small": str or None, "steps": int, "rare_test": int}``.

    Raises:
        ValueError: one line naming the setting to change: a split that cannot be drawn, a set
            size larger than the pool, a cache with classes the data set lacks or none of the
            rare class, or (``strict``) an adapter of another image size or channel count.
    """
    rare_name = data.classes[data.rare]
    n_real = None
    for seed in cfg.seed_list:
        train_idx, _rare = data.split(shots=cfg.shots, per_class=cfg.per_class, seed=seed)
        data.validation_split(train_idx, val_shots=cfg.val_shots, val_per_class=cfg.val_per_class(), seed=seed)
        n_real = len(train_idx)
    draws_synthetic = any(p["kind"].startswith("synthetic") or p["kind"] == "oversampled+synthetic" for p in cfg.arm_plan())
    warnings: List[str] = []
    if draws_synthetic:
        pool = _check_cache(cfg, data) if cfg.cache else int(cfg.synthetic_images)
        too_big = sorted(n for n in set(cfg.set_sizes) if n > pool)
        if "synthetic" in cfg.arms and too_big:
            where = f"--cache {cfg.cache} holds {pool} images of {rare_name!r}" if cfg.cache else f"the pool holds --synthetic-images {pool}"
            raise ValueError(f"--set-sizes {too_big} are larger than the synthetic pool ({where}); lower them to at most {pool}, "
                             "raise --synthetic-images, or pass --set-sizes '' for no set-size arms")
        geometry = _check_geometry(cfg, data)
        if geometry:
            if cfg.strict:
                raise ValueError(geometry + "; --strict refuses it")
            warnings.append(geometry)
    steps = steps_of(n_real)
    rare_test = rare_test_support(data, test_indices)
    small = []
    if steps < MIN_STEPS:
        small.append(f"{steps} optimizer steps per arm (under {MIN_STEPS}: raise --epochs or --steps)")
    if rare_test < MIN_RARE_TEST:
        small.append(f"{rare_test} rare ({rare_name!r}) test images (under {MIN_RARE_TEST}: recall and F1 move in steps of {1 / max(rare_test, 1):.2f})")
    if len(cfg.seed_list) < 2:
        small.append("one seed (no spread, no confidence interval)")
    too_small = ("too small to compare arms: " + "; ".join(small)) if small else None
    return {"warnings": warnings, "too_small": too_small, "steps": steps, "rare_test": rare_test}


def rare_test_support(data: StudyData, test_indices: Optional[Sequence[int]] = None) -> int:
    """The number of evaluated test images of the rare class (with the finding, multi-label)."""
    targets = _targets(data.test)
    if targets is None:
        return len(test_indices) if test_indices is not None else len(data.test)
    targets = np.asarray(targets)
    if test_indices is not None:
        targets = targets[np.asarray(list(test_indices), dtype=np.int64)]
    if targets.ndim == 2:
        return int((targets[:, data.rare] > 0).sum())
    return int((targets == data.rare).sum())


def _targets(dataset: Any):
    for _ in range(4):
        if dataset is None:
            return None
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            return targets.numpy() if hasattr(targets, "numpy") else targets
        dataset = getattr(dataset, "dataset", None)
    return None


def _check_cache(cfg, data: StudyData) -> int:
    """The given cache's records of the rare class; refuses one whose classes the data set lacks."""
    from synthaug.cache.store import SyntheticCache
    from synthaug.evaluation.sweep_pools import study_class

    cache = SyntheticCache(cfg.cache, readonly=True)
    try:
        names = cache.label_names
        counts = cache.class_counts()
    finally:
        cache.close()
    lacking, rare = [], 0
    for v, n in sorted(counts.items()):
        mapped = study_class(v, names, data.classes)
        name = names[v] if names is not None and 0 <= v < len(names) and names[v] else None
        shown = f"{v} ({name!r})" if name else str(v)
        if mapped is None:
            lacking.append(f"{shown} ×{n}")
        elif mapped == data.rare:
            rare += n
    if lacking:
        raise ValueError(
            f"--cache {cfg.cache} holds records of classes {data.name} lacks: {', '.join(lacking)} (its classes: {data.classes}); "
            f"relabel them (synthaug cache relabel {cfg.cache} --class-name NAME --classes ...) or give a cache of this data set's classes"
        )
    if not rare:
        raise ValueError(f"--cache {cfg.cache} holds no image of the rare class {data.classes[data.rare]!r}; give a cache generated for it")
    return rare


def _generator_geometry(cfg) -> Optional[Dict[str, Any]]:
    """``{"what", "size", "channels"}`` of the images the sweep's generator makes, or ``None``
    when unknown (a Stable-Diffusion base model trains at the resolution it is given)."""
    from synthaug.adapter import read_adapter_config

    if cfg.adapter:
        a = read_adapter_config(cfg.adapter, require_weights=False)
        if a.get("resolution") is None:
            return None
        return {"what": f"adapter {cfg.adapter}", "size": int(a["resolution"]), "channels": a.get("channels")}
    if cfg.cache or not cfg.base_model:
        return None
    from synthaug.generation.sources import resolve_source

    source = resolve_source(cfg.base_model, adapters=False, what="model")
    if source.backend != "pixel-ddpm":
        return None
    model = json.loads((Path(source.path) / "synthaug_model.json").read_text())
    size = int((model.get("crop") or [0, 0, model.get("image_size", 32)])[2])
    return {"what": f"base model {source.ref}", "size": size, "channels": model.get("channels", 1)}


def _check_geometry(cfg, data: StudyData) -> Optional[str]:
    geo = _generator_geometry(cfg)
    if geo is None:
        return None
    size_differs = geo["size"] != data.size
    channels_differ = geo["channels"] is not None and int(geo["channels"]) != data.channels
    if not (size_differs or channels_differ):
        return None
    ch = geo["channels"] if geo["channels"] is not None else "?"
    return (f"{geo['what']} makes {geo['size']}×{geo['size']} images with {ch} channel(s), but the study's images are "
            f"{data.size}×{data.size} with {data.channels}: synthetic images are resized and converted to fit, which may "
            f"not look like the real ones")

