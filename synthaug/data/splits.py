"""Few-shot imbalanced training splits and the images a LoRA is trained on.

The study's setting: the rare class has ``shots`` real training images, every other class ``m``;
evaluation uses the real held-out test split only. Everything is drawn with a seeded
``numpy.random.Generator`` so a (seed, shots, m) triple names one split on every machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from synthaug.imaging import to_hwc_uint8

__all__ = ["FewShotSplit", "class_index", "few_shot_split", "targets_of", "write_images"]


def targets_of(dataset) -> np.ndarray:
    """Integer class labels of a dataset: its ``targets`` attribute when it has one
    (torchvision style), else by reading every item (slow, but works for any dataset)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets.tolist() if hasattr(targets, "tolist") else targets)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def class_index(dataset, name_or_index: Union[str, int]) -> int:
    """The class index of ``name_or_index`` in ``dataset.classes`` (an int passes through)."""
    if isinstance(name_or_index, (int, np.integer)):
        return int(name_or_index)
    classes = list(getattr(dataset, "classes", []) or [])
    if name_or_index in classes:
        return classes.index(name_or_index)
    lowered = {c.lower(): i for i, c in enumerate(classes)}
    if str(name_or_index).lower() in lowered:
        return lowered[str(name_or_index).lower()]
    raise ValueError(f"class {name_or_index!r} is not one of the dataset's classes: {', '.join(classes) or '(none named)'}")


@dataclass
class FewShotSplit:
    """Indices into the full training dataset.

    Attributes:
        train: every index of the imbalanced training set (rare and others), sorted.
        rare: the ``shots`` indices of the rare class (a subset of ``train``).
        rare_class: the rare class's index; ``seed``, ``shots``, ``per_class`` as drawn.
    """

    train: np.ndarray
    rare: np.ndarray
    rare_class: int
    seed: int
    shots: int
    per_class: Optional[int]

    def subset(self, dataset):
        import torch

        return torch.utils.data.Subset(dataset, self.train.tolist())


def few_shot_split(dataset, rare_class: Union[str, int], *, shots: int, per_class: Optional[int] = 1000, seed: int = 0) -> FewShotSplit:
    """Draw the rare class's ``shots`` images and ``per_class`` images of every other class.

    Args:
        dataset: a labelled dataset (``targets``/``classes`` used when present).
        rare_class: name or index of the rare class.
        shots: real rare-class images kept (the study uses 20–50).
        per_class: images kept per other class (``None``: all of them).
        seed: the draw's seed.

    Raises:
        ValueError: unknown class, or more shots/images asked for than the dataset has.
    """
    rare = class_index(dataset, rare_class)
    targets = targets_of(dataset)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    names = list(getattr(dataset, "classes", []) or [])
    rng = np.random.default_rng(seed)
    chosen: List[np.ndarray] = []
    rare_idx = None
    for c in np.unique(targets):
        idx = np.nonzero(targets == c)[0]
        want = shots if c == rare else (len(idx) if per_class is None else per_class)
        if want > len(idx):
            name = f"{names[c]!r} (label {c})" if c < len(names) else str(c)
            option = "--shots" if c == rare else "--per-class"
            raise ValueError(f"class {name} has {len(idx)} training images; cannot draw {want} for {option}: lower {option} to at most {len(idx)}")
        pick = np.sort(rng.choice(idx, size=want, replace=False))
        if c == rare:
            rare_idx = pick
        chosen.append(pick)
    if rare_idx is None:
        raise ValueError(f"the dataset holds no image of class {rare_class!r}")
    return FewShotSplit(np.sort(np.concatenate(chosen)), rare_idx, rare, seed, shots, per_class)


def write_images(dataset, indices: Sequence[int], folder: Union[str, os.PathLike], *, prefix: str = "img") -> List[Path]:
    """Save ``dataset[i]`` images (PIL or uint8 arrays) as PNG files ``{prefix}_{i:06d}.png``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        arr = to_hwc_uint8(dataset[int(i)][0])
        path = folder / f"{prefix}_{int(i):06d}.png"
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)
        paths.append(path)
    return paths
