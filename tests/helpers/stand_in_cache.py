"""TEST FIXTURE: a synthetic cache filled with *real* Fashion-MNIST test-split images of one class.

The generator is built elsewhere, in parallel; the mixing tests and examples only need a cache
whose records look like what ``synthaug generate`` writes (uint8 28×28×1 images, an int label,
the Fashion-MNIST class names as ``label_names``, a provenance dict). This stand-in is *not*
synthetic data and must never be used as such outside tests.

    python -m tests.helpers.stand_in_cache CACHE_DIR [N] [CLASS_NAME]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from synthaug.cache.store import SyntheticCache
from synthaug.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

__all__ = ["build_stand_in_cache", "stand_in_images"]

_TEST_SPLIT = None


def stand_in_images(n: int, class_name: str = "Shirt", offset: int = 0) -> np.ndarray:
    """uint8 n×28×28×1: Fashion-MNIST *test*-split images of ``class_name`` (cycled if n is large)."""
    global _TEST_SPLIT
    if _TEST_SPLIT is None:
        _TEST_SPLIT = FashionMNIST(train=False)
    label = FASHION_MNIST_CLASSES.index(class_name)
    pool = _TEST_SPLIT.data.numpy()[_TEST_SPLIT.targets.numpy() == label]
    idx = (np.arange(n) + offset) % len(pool)
    return pool[idx][..., None].copy()


def build_stand_in_cache(
    path: Union[str, Path],
    n: int = 200,
    class_name: str = "Shirt",
    *,
    classes: Optional[Sequence[str]] = None,
    max_items: Optional[int] = None,
    chunk: int = 64,
) -> SyntheticCache:
    """A cache at ``path`` holding ``n`` stand-in records of ``class_name`` (or, with
    ``classes``, record ``i`` of class ``classes[i % len(classes)]``), appended ``chunk`` per
    transaction like a generation worker does."""
    cache = SyntheticCache(path, label_names=list(FASHION_MNIST_CLASSES), max_items=max_items, sync=False)
    names = list(classes) if classes else [class_name]
    per_class = {c: stand_in_images(n // len(names) + 1, c) for c in names}
    images = np.stack([per_class[names[i % len(names)]][i // len(names)] for i in range(n)])
    labels = np.array([FASHION_MNIST_CLASSES.index(names[i % len(names)]) for i in range(n)])
    for s in range(0, n, chunk):
        metas = [{"source": "test fixture: Fashion-MNIST test split (not generated)", "index": int(i)} for i in range(s, min(n, s + chunk))]
        cache.append(images[s : s + chunk], [int(v) for v in labels[s : s + chunk]], metas)
    return cache


if __name__ == "__main__":
    target = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    name = sys.argv[3] if len(sys.argv) > 3 else "Shirt"
    c = build_stand_in_cache(target, count, name)
    print(f"wrote {len(c)} stand-in records of {name!r} to {target}")
