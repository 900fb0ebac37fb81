"""Generate images into a cache: the one loop behind ``synthaug generate``, the sweep's pre-fill
and every batch of the :class:`~synthaug.generation.worker.GenerationWorker`.

The rule it keeps (the worker protocol's seed rule): the images stored as sequence numbers
``q, q+1, ...`` are made by ``generator.generate(k, seed + q)``, so record ``q`` has per-image
seed ``seed + q``. ``q`` is the cache's ``next_seq`` read just before generating; a run on the
same cache with the same ``seed`` continues where the last one stopped and never repeats a seed.
The caller must be the only writer of its seed block meanwhile (the worker and ``synthaug
generate`` hold the block's writer lock, :mod:`synthaug.cache.writers`; the sweep fills a cache
of its own), so that no other writer moves ``next_seq`` in between.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import numpy as np
from tqdm.auto import tqdm

from synthaug.generation.stopping import StopRequested, StopSignal

__all__ = ["FillResult", "fill_cache", "generate_into"]

Transform = Callable[[np.ndarray], Any]


def generate_into(
    generator,
    cache,
    count: int,
    first_seq: int,
    *,
    seed: int,
    label=None,
    transform: Optional[Transform] = None,
    fit_within: Optional[int] = None,
    stop: Optional[StopSignal] = None,
    stored: Optional[Callable[[List[int]], None]] = None,
) -> List[int]:
    """Make ``count`` images at per-image seeds ``seed + first_seq, ...`` and append them in one
    transaction; return the sequence numbers they got.

    Args:
        label: the label of every record (default: the generator's label of each image); the
            provenance keeps the generator's own in ``meta["label"]``.
        transform: applied to each generated image (uint8 H×W×C) before it is stored, e.g. a
            resize to the classifier's input size.
        fit_within: the worker's limit (:meth:`SyntheticCache.append`); fewer, or no, images may
            be stored then.
        stop: the append runs inside ``stop.critical()``: a stop requested during it is raised
            after the transaction, never inside it.
        stored: called with the new sequence numbers right after the append, inside the same
            critical section, so the caller's account of what was stored is complete even when
            a stop is raised next.
    """
    batch = generator.generate(count, seed + first_seq)
    images = batch.images if transform is None else [transform(im) for im in batch.images]
    labels = batch.labels if label is None else label
    with stop.critical() if stop is not None else nullcontext():
        seqs = cache.append(images, labels, batch.meta, fit_within=fit_within)
        if stored is not None:
            stored(seqs)
    return seqs


@dataclass
class FillResult:
    """What :func:`fill_cache` stored: ``seqs`` in order, ``seconds`` spent, ``interrupted`` when
    a stop (SIGTERM/SIGINT through ``stop``) ended it early."""

    seqs: List[int] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def written(self) -> int:
        return len(self.seqs)

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def fill_cache(
    generator,
    cache,
    count: int,
    *,
    seed: int,
    label=None,
    transform: Optional[Transform] = None,
    batch_size: Optional[int] = None,
    stop: Optional[StopSignal] = None,
    progress: bool = False,
    desc: str = "generate",
    leave: bool = True,
) -> FillResult:
    """Add ``count`` images from ``generator`` to ``cache``, ``batch_size`` per append.

    Args:
        generator: a :class:`~synthaug.generation.base.Generator`.
        cache: a writable :class:`~synthaug.cache.store.SyntheticCache`.
        seed: base seed; the record stored as seq ``q`` gets per-image seed ``seed + q``.
        label, transform: as for :func:`generate_into`.
        batch_size: images per ``generate`` call and per append (default: the generator's
            ``batch_size``, else 8).
        stop: an installed :class:`~synthaug.generation.stopping.StopSignal`: a stop ends the
            fill after the append in progress and returns with ``interrupted`` set.
        progress: show a tqdm bar (``desc``; ``leave``: keep it on screen when done).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    chunk = max(1, int(batch_size or getattr(generator, "batch_size", None) or 8))
    result = FillResult()
    t0 = time.perf_counter()
    with tqdm(total=count, desc=desc, unit="img", disable=not progress, leave=leave, dynamic_ncols=True) as bar:

        def stored(seqs: List[int]) -> None:
            result.seqs.extend(seqs)
            bar.update(len(seqs))

        try:
            while result.written < count:
                k = min(chunk, count - result.written)
                generate_into(generator, cache, k, cache.bounds()[1], seed=seed, label=label, transform=transform, stop=stop, stored=stored)
        except StopRequested:
            result.interrupted = True
    result.seconds = time.perf_counter() - t0
    return result
