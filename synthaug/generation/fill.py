"""Generate images into a cache: the one loop behind ``synthaug generate``, the sweep's pre-fill
and every batch of the :class:`~synthaug.generation.worker.GenerationWorker`, with an optional
fidelity gate (:mod:`synthaug.generation.gate`) between generating and storing.

Seeds
-----
Every stored record's per-image seed is in its ``meta["seed"]``, and no seed of a seed block
(``seed // 10**9``, :mod:`synthaug.cache.writers`) is ever used twice. A block follows one of two
rules:

1. **Sequence rule** (the block has no seed counter: no gated writer has written in it). The
   images stored as sequence numbers ``q, q+1, ...`` are made by ``generator.generate(k, seed +
   q)``, so record ``q`` has per-image seed ``seed + q``. ``q`` is the cache's ``next_seq`` read
   just before generating; a run with the same ``seed`` continues where the last one stopped, and
   a batch lost to a kill is generated again at the same seeds (nothing of it was stored).
2. **Counter rule** (the block has a seed counter). A gate stores only some of what it is given,
   and ``next_seq`` advances only for stored records, so it no longer counts the seeds used. The
   block's counter does: every seed below it has been used or reserved. It is kept in the cache
   (meta ``seeds/<block>``; :meth:`SyntheticCache.seed_counter`), and a batch of ``k`` images gets
   its seeds from :meth:`SyntheticCache.reserve_seeds` *before* it is generated, in one
   transaction: ``c, ..., c + k - 1`` with ``c = max(seed + next_seq, counter)``, the counter
   becoming ``c + k``. So a seed is used at most once, whether its image is stored, rejected by the
   gate, not stored (no room, or more accepted than asked for) or lost to a kill; a killed batch's
   seeds are skipped, not redone. A gated writer puts its block under this rule, and every later
   writer of the block follows it, gated or not, so gated and ungated runs may alternate on one
   cache without repeating a seed.

The caller must be the only writer of its seed block meanwhile (the worker and ``synthaug
generate`` hold the block's writer lock, :mod:`synthaug.cache.writers`; the sweep fills a cache
of its own).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from synthaug.generation.gate import FidelityGate, check_acceptance
from synthaug.generation.stopping import StopRequested, StopSignal
from synthaug.progress import progress_bar

__all__ = ["Batch", "FillResult", "fill_cache", "generate_into"]

Transform = Callable[[np.ndarray], Any]


@dataclass
class Batch:
    """What one :func:`generate_into` call did.

    Attributes:
        seqs: sequence numbers of the stored records, in order.
        seeds: their per-image seeds.
        generated: images made (before the gate), at seeds ``first_seed, ..., first_seed + generated - 1``.
        rejected: images the gate refused.
        surplus: accepted images left out by ``at_most``.
        first_seed: the per-image seed of the first image made.
    """

    seqs: List[int]
    seeds: List[int]
    generated: int
    rejected: int
    surplus: int
    first_seed: int

    @property
    def accepted(self) -> int:
        """Images that passed the gate (all of them without one)."""
        return self.generated - self.rejected

    @property
    def next_seed(self) -> int:
        return self.first_seed + self.generated


def generate_into(
    generator,
    cache,
    count: int,
    first_seed: int,
    *,
    label=None,
    transform: Optional[Transform] = None,
    gate: Optional[FidelityGate] = None,
    at_most: Optional[int] = None,
    fit_within: Optional[int] = None,
    stop: Optional[StopSignal] = None,
    stored: Optional[Callable[[Batch], None]] = None,
) -> Batch:
    """Make ``count`` images at per-image seeds ``first_seed, first_seed + 1, ...``, keep those the
    gate accepts and append them in one transaction. Which seeds to use is the caller's (module
    docstring); the images' own ``meta["seed"]`` is kept (set from their position if missing).

    Args:
        label: the label of every record (default: the generator's label of each image); the
            provenance keeps the generator's own in ``meta["label"]``.
        transform: applied to each generated image (uint8 H×W×C) before it is scored and
            stored, e.g. a resize to the classifier's input size.
        gate: a :class:`~synthaug.generation.gate.FidelityGate`: only the images it accepts are
            stored, each with ``meta["gate_score"]`` and ``meta["gate"]`` (its spec).
        at_most: store at most this many of the accepted images (the first ones; the others
            count as ``surplus``).
        fit_within: the worker's limit (:meth:`SyntheticCache.append`); fewer, or no, images may
            be stored then.
        stop: the append runs inside ``stop.critical()``: a stop requested during it is raised
            after the transaction, never inside it.
        stored: called with the :class:`Batch` right after the append (also when nothing was
            stored), inside the same critical section, so the caller's account of what was
            stored is complete even when a stop is raised next.
    """
    batch = generator.generate(count, first_seed)
    made = len(batch.images)
    images = batch.images if transform is None else [transform(im) for im in batch.images]
    metas: List[Dict[str, Any]] = [dict(m) for m in batch.meta]
    for i, m in enumerate(metas):
        m.setdefault("seed", first_seed + i)
    keep = np.ones(made, bool)
    if gate is not None:
        keep, scores = gate.filter(images)
        spec = gate.spec
        for m, s in zip(metas, scores):
            m["gate_score"] = float(s)
            m["gate"] = spec
    idx = np.nonzero(keep)[0]
    rejected = made - len(idx)
    surplus = 0
    if at_most is not None and len(idx) > at_most:
        surplus, idx = len(idx) - at_most, idx[: max(0, at_most)]
    kept_images = images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]
    kept_labels = label if label is not None else [batch.labels[i] for i in idx]
    kept_metas = [metas[i] for i in idx]
    with stop.critical() if stop is not None else nullcontext():
        seqs = cache.append(kept_images, kept_labels, kept_metas, fit_within=fit_within) if len(idx) else []
        out = Batch(seqs=list(seqs), seeds=[kept_metas[j]["seed"] for j in range(len(seqs))], generated=made, rejected=rejected,
                    surplus=surplus, first_seed=first_seed)
        if stored is not None:
            stored(out)
    return out


@dataclass
class FillResult:
    """What :func:`fill_cache` did.

    Attributes:
        seqs, seeds: the stored records' sequence numbers and per-image seeds, in order.
        seconds: time spent; ``interrupted``: a stop (SIGTERM/SIGINT through ``stop``) ended it early.
        generated: images made (before the gate); ``rejected``: refused by the gate;
            ``surplus``: accepted in the last batch beyond ``count``, not stored.
        next_seed: the first per-image seed the next run of this block will use.
    """

    seqs: List[int] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    generated: int = 0
    rejected: int = 0
    surplus: int = 0
    next_seed: Optional[int] = None

    @property
    def written(self) -> int:
        return len(self.seqs)

    @property
    def accepted(self) -> int:
        return self.generated - self.rejected

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Share of the generated images that passed the gate (1.0 without one; ``None`` before any)."""
        return self.accepted / self.generated if self.generated else None

    @property
    def images_per_s(self) -> float:
        """Stored (accepted) images per second, generation and gating included."""
        return self.written / self.seconds if self.seconds > 0 else 0.0


def fill_cache(
    generator,
    cache,
    count: int,
    *,
    seed: int,
    label=None,
    transform: Optional[Transform] = None,
    gate: Optional[FidelityGate] = None,
    batch_size: Optional[int] = None,
    stop: Optional[StopSignal] = None,
    progress: bool = False,
    desc: str = "generate",
    leave: bool = True,
) -> FillResult:
    """Add ``count`` images from ``generator`` to ``cache`` (with a gate: ``count`` accepted
    images), ``batch_size`` per append.

    Args:
        generator: a :class:`~synthaug.generation.base.Generator`.
        cache: a writable :class:`~synthaug.cache.store.SyntheticCache`.
        seed: base seed; per-image seeds follow the module docstring's rules (without a gate, on
            a block without a counter: record ``q`` gets ``seed + q``).
        label, transform: as for :func:`generate_into`.
        gate: a :class:`~synthaug.generation.gate.FidelityGate`; generation goes on until
            ``count`` images are accepted, and stops with ``RuntimeError`` (naming the rate) when
            fewer than 1% of at least 300 generated images passed
            (:func:`~synthaug.generation.gate.check_acceptance`).
        batch_size: images per ``generate`` call and per append (default: the generator's
            ``batch_size``, else 8). With a gate, a batch is sized by the acceptance rate seen so
            far, up to ``batch_size``; accepted images beyond ``count`` are not stored (``surplus``).
        stop: an installed :class:`~synthaug.generation.stopping.StopSignal`: a stop ends the
            fill after the append in progress and returns with ``interrupted`` set.
        progress: show a tqdm bar of stored images (``desc``; ``leave``: keep it on screen when done).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if gate is not None and not isinstance(gate, FidelityGate):
        raise ValueError(f"gate must be a FidelityGate, got {type(gate).__name__}")
    chunk = max(1, int(batch_size or getattr(generator, "batch_size", None) or 8))
    counted = gate is not None or cache.seed_counter(seed) is not None  # the counter rule (module docstring)
    result = FillResult()
    t0 = time.perf_counter()
    with progress_bar(total=count, desc=desc, unit="img", disable=not progress, leave=leave, dynamic_ncols=True) as bar:

        def stored(out: Batch) -> None:
            result.seqs.extend(out.seqs)
            result.seeds.extend(out.seeds)
            result.generated += out.generated
            result.rejected += out.rejected
            result.surplus += out.surplus
            bar.update(len(out.seqs))
            if gate is not None:
                bar.set_postfix_str(f"accepted {result.acceptance_rate:.0%} of {result.generated}")

        try:
            while result.written < count:
                remaining = count - result.written
                k = min(chunk, remaining)
                if gate is not None and result.generated:  # expect the acceptance rate seen so far
                    k = min(chunk, math.ceil(remaining * result.generated / max(1, result.accepted)))
                if counted:  # reserve the batch's seeds before making them
                    with stop.critical() if stop is not None else nullcontext():
                        first = cache.reserve_seeds(seed, k)
                else:
                    first = seed + cache.bounds()[1]
                generate_into(generator, cache, k, first, label=label, transform=transform, gate=gate, at_most=remaining, stop=stop,
                              stored=stored)
                if gate is not None:
                    check_acceptance(result.accepted, result.generated, gate)
        except StopRequested:
            result.interrupted = True
    counter = cache.seed_counter(seed)
    result.next_seed = max(seed + cache.bounds()[1], counter if counter is not None else 0)
    result.seconds = time.perf_counter() - t0
    return result
