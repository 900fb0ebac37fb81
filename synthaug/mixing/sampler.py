"""``RatioBatchSampler``: batches of real and synthetic items at an exact synthetic ratio.

See the class docstring for the rules, the batch count and the determinism contract;
:mod:`synthaug.mixing.ratio` holds the arithmetic and :mod:`synthaug.mixing.pool` the choice of
synthetic records.

One concept in one module (longer than the ~600 lines the project aims at, on purpose): the sampler,
whose batch plan, resume state, holds and counters share its state.
"""

from __future__ import annotations

import numbers
import os
import random
import time
import warnings
import weakref
from collections import deque
from fractions import Fraction
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Sampler

from synthaug.cache.codec import Label, label_class
from synthaug.mixing.adaptive import AdaptiveRatio
from synthaug.mixing.dataset import MixedDataset
from synthaug.mixing.index import SyntheticIndex
from synthaug.mixing.pool import ON_EXHAUSTED, NeedRecords, SyntheticPool
from synthaug.mixing.ratio import EpochPlan, StretchPlan, as_fraction, plan_epoch, plan_stretches, split_by_deficit

__all__ = ["RatioBatchSampler", "Ratio"]

Ratio = Union[float, Fraction, Mapping[Union[int, str], float], Callable[[int], float], AdaptiveRatio]
_STATE_FORMAT = 1
_COUNTER_NAMES = ("served", "fresh", "reused", "waited_s", "real", "evicted_unseen", "corrupt_skipped")
# batches tracked as in flight (handed to the DataLoader, not read yet); older ones count as read
_INFLIGHT_MAX = 4096


def _dist_defaults() -> Tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 1, 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _cache_shard(value: Any, rank: int, world: int) -> Tuple[int, int]:
    if value is None:
        return rank, world
    if value == "local":
        missing = [k for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE") if k not in os.environ]
        if missing:
            raise ValueError(f"cache_shard='local' reads {' and '.join(missing)} from the environment (set by torchrun); they are not set")
        value = (int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"cache_shard must be None, 'local' or (index, count), got {value!r}")
    index, count = int(value[0]), int(value[1])
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"cache_shard (index, count) needs 0 <= index < count, got {value!r}")
    return index, count


def _int_arg(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class RatioBatchSampler(Sampler):
    """Yields batches that hold real and synthetic items at an exact ratio (docs/DESIGN.md, "Mixing rules").

    Use it as a DataLoader's ``batch_sampler`` over a :class:`~synthaug.mixing.dataset.MixedDataset`.
    Each batch is a list: the real items first, as ``int`` indices into the real dataset, then the
    synthetic items as :class:`~synthaug.mixing.index.SyntheticIndex` (cache sequence numbers).

    Args:
        mixed: the :class:`MixedDataset` whose real dataset and cache the batches index.
        batch_size: ``B``, items per batch (>= 1).
        synthetic_ratio: ``r``, the share of synthetic items: a number in [0, 1) (1 too with
            ``batches_per_epoch``), read as the nearest fraction with denominator <= 10**6 (0.3 is
            3/10); or a dict ``{class: r_c}`` (class index or name) giving each class its own
            share (``r`` is their exact sum; synthetic draws are limited to those classes); or a
            callable ``epoch -> r`` (a schedule, evaluated at each epoch, same rules); or an
            :class:`~synthaug.mixing.adaptive.AdaptiveRatio`, a per-class ratio its controller
            changes during training (below, "Adaptive ratio").
        shuffle: shuffle the real indices (a permutation fixed by ``(seed, epoch)``); ``False``
            takes them in order.
        seed: seed of the real shuffle and of the choice among equally reused records (>= 0).
        drop_last: leave out the last, shorter batch, and trim the real data to a multiple of
            ``num_replicas`` instead of padding it (as ``DistributedSampler`` does).
        num_replicas, rank: DDP world size and this process's global rank; by default from
            ``torch.distributed`` when it is initialized, else 1 and 0.
        cache_shard: which of the cache's records this rank takes, ``(index, count)``: those with
            ``seq % count == index``. Default ``(rank, num_replicas)``: one cache shared by every
            rank. ``"local"``: ``(LOCAL_RANK, LOCAL_WORLD_SIZE)`` from torchrun's environment, for
            one node-local cache (and one worker) per node, shared by that node's ranks only; with
            it the real data is still sharded over the whole world.
        classes: class indices or names of the real dataset; synthetic records of other
            classes are skipped. Not together with a dict ``synthetic_ratio``.
        on_exhausted: what to do when no fresh synthetic record is left: ``"reuse"`` (serve
            already served records, least served first), ``"wait"`` (block until the generation
            worker appends one) or ``"error"`` (raise ``SyntheticExhaustedError``).
        max_reuse: with ``"reuse"``, the most times one record may be served *again* after its
            first, fresh serve (so at most ``1 + max_reuse`` serves in total, over all epochs);
            ``None`` is unbounded, 0 never reuses. When every retained record is at its cap, the
            sampler waits for new records as under ``"wait"``, with the same timeout.
        wait_timeout: seconds one wait may last before ``SyntheticExhaustedError`` (an empty
            cache under ``"reuse"`` waits too).
        batches_per_epoch: fix the epoch length instead of deriving it from the real data (see
            below). Required for ``r = 1``.
        consumer: this sampler's name in the cache's cursor table (``"{rank}"`` is replaced by
            the rank); default ``"mixing-rank{rank}"``. Ranks must not share a name.
        cursor_interval: the least seconds between two cursor writes (each is one write
            transaction); the cursor is also written at each epoch end and before waiting.
        history: batches of undo journal kept for ``state_dict(consumed=...)``.

    Composition (rules 1, 2, 4, 5): with ``q = r·B`` in exact rational arithmetic, full batch
    ``i`` (from 0 in the epoch) holds ``k_i = floor(q·(i+1)) − floor(q·i)`` synthetic and
    ``B − k_i`` real items, so after ``n`` full batches exactly ``floor(q·n)`` items were
    synthetic. With per-class shares, each batch's ``k_i`` slots go, one by one, to the class
    furthest below its running target ``r_c·B·(i+1)`` (each class stays within 2 of it).

    Batch count per epoch: the real indices are shuffled by ``(seed, epoch)``, padded (repeating
    the first ones) or, with ``drop_last``, trimmed to a multiple of ``num_replicas``, and rank
    ``k`` takes every ``num_replicas``-th from position ``k`` — a shard of ``N`` indices, equal on
    every rank. ``n_full = floor(N / (B − q))`` full batches fit (real items used after ``n``
    batches: ``n·B − floor(q·n)``), leaving ``L = N − (n_full·B − floor(q·n_full))`` real items,
    ``0 <= L < B``. If ``L > 0`` and not ``drop_last``, a last batch holds these ``L`` real items
    and ``floor(L·r / (1 − r))`` synthetic ones (share at most ``r``): ``n_full + 1`` batches;
    otherwise ``n_full``. Every real index of the shard appears exactly once per epoch (minus the
    ``L`` left out under ``drop_last``). With ``batches_per_epoch = n``, every epoch holds ``n``
    full batches, and the real items come from an endless stream of shuffled passes over the
    shard (pass ``p`` shuffled by ``(seed, p)``, continuing from epoch to epoch), so each real
    index is used once per pass; ``r = 1`` gives all-synthetic batches. All ranks yield the same
    number of batches.

    Synthetic records (rule 3): fresh first — never handed to this consumer, oldest first —
    then ``on_exhausted``. A rank takes only the records of its ``cache_shard`` (``seq % count == index``). The
    records added by a generation worker during an epoch are used in that epoch: every batch reads
    the cache's current contents. The cursor (all records below it handed out or skipped) is
    written to the cache's cursor table under ``consumer``, throttled. A new sampler (no state
    loaded) treats every retained record as fresh.

    No record is evicted between its draw and its read: each batch's synthetic indices carry a
    ticket that the :class:`MixedDataset` marks when a DataLoader worker (or the main process)
    has read them, and beside the cursor the sampler publishes a *hold*, the oldest record it may
    still read — below every batch in flight (yielded, not read yet: up to ``num_workers ×
    prefetch_factor`` batches, tracked up to 4,096), below the batch being drawn, and, under
    ``on_exhausted="reuse"``, below the served records it keeps for reuse until a writer asks
    for room (``cache.request_eviction``). Writers never evict at or above a live consumer's
    hold, and the sampler never draws below its own. Read the batches through this sampler's
    ``mixed`` dataset (the DataLoader's ``dataset``), so the tickets are seen. A sampler that stops
    drawing keeps its hold while its process lives; :meth:`close` removes it. Each synthetic
    index also carries the record's label and the shard stride, so a record found corrupt when
    read is replaced by one of the same label and shard (:class:`MixedDataset`, ``on_corrupt``).

    Adaptive ratio: with an :class:`~synthaug.mixing.adaptive.AdaptiveRatio`, each change the
    controller makes takes effect at a batch boundary: the next batch this sampler yields (under
    DDP, the furthest any rank's sampler has got, so every rank changes at the same batch). The
    sampler records ``(epoch, batch, ratios)`` of every change; a stretch between two changes is
    planned as an epoch of its own over the real items still unused, so within it batch ``i``
    holds ``floor(q·(i − s + 1)) − floor(q·(i − s))`` synthetic items (``s`` its first batch),
    and per-class slots are split from the stretch's start. The changes are part of
    :meth:`state_dict` (with the controller's state): a resumed sampler applies them at the same
    batches. A change at or after the epoch's last batch applies from the next epoch.

    Determinism contract: the batch shapes (which positions are synthetic, ``len``) and the real
    indices of every batch are a pure function of ``(seed, epoch, r, B, len(real), num_replicas,
    rank, drop_last, batches_per_epoch)``, identical on every rank and every run. The synthetic
    sequence numbers are a function of the sampler's state at the start of the epoch (cursor,
    serve counts; see :meth:`state_dict`) and the cache's contents: two samplers with the same
    arguments and state over the same cache contents yield identical batches, and a sampler
    restored with :meth:`load_state_dict` yields exactly the batches the original would have
    yielded next. Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``):
    without it every epoch repeats the same real order.
    """

    def __init__(
        self,
        mixed: MixedDataset,
        *,
        batch_size: int,
        synthetic_ratio: Ratio,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        classes: Optional[Sequence[Union[int, str]]] = None,
        on_exhausted: str = "reuse",
        max_reuse: Optional[int] = None,
        wait_timeout: float = 600.0,
        batches_per_epoch: Optional[int] = None,
        consumer: Optional[str] = None,
        cursor_interval: float = 0.5,
        history: int = 1024,
        cache_shard: Optional[Union[str, Tuple[int, int]]] = None,
    ) -> None:
        if not isinstance(mixed, MixedDataset):
            raise ValueError(
                f"mixed must be a synthaug.MixedDataset (the real dataset and the cache together), got {type(mixed).__name__}"
            )
        self.mixed = mixed
        self.batch_size = _int_arg(batch_size, "batch_size", 1)
        self.batches_per_epoch = None if batches_per_epoch is None else _int_arg(batches_per_epoch, "batches_per_epoch", 1)
        self.seed = _int_arg(seed, "seed", 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        self.on_exhausted = on_exhausted
        if max_reuse is not None:
            max_reuse = _int_arg(max_reuse, "max_reuse", 0)
            if on_exhausted != "reuse":
                raise ValueError(f"max_reuse limits reuse, but on_exhausted={on_exhausted!r} never reuses; drop max_reuse or use 'reuse'")
        self.max_reuse = max_reuse
        if isinstance(wait_timeout, bool) or not isinstance(wait_timeout, numbers.Real) or not wait_timeout > 0:
            raise ValueError(f"wait_timeout must be a number of seconds > 0, got {wait_timeout!r}")
        self.wait_timeout = float(wait_timeout)
        if isinstance(cursor_interval, bool) or not isinstance(cursor_interval, numbers.Real) or cursor_interval < 0:
            raise ValueError(f"cursor_interval must be a number of seconds >= 0, got {cursor_interval!r}")
        self.cursor_interval = float(cursor_interval)
        self.history = _int_arg(history, "history", 0)

        world, me = _dist_defaults()
        self.num_replicas = world if num_replicas is None else _int_arg(num_replicas, "num_replicas", 1)
        self.rank = me if rank is None else _int_arg(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in 0..num_replicas-1 = 0..{self.num_replicas - 1}, got {self.rank}")
        self.cache_shard = _cache_shard(cache_shard, self.rank, self.num_replicas)
        self.consumer = (consumer if consumer is not None else "mixing-rank{rank}").replace("{rank}", str(self.rank))
        if not self.consumer:
            raise ValueError("consumer must be a non-empty name")

        n = len(mixed.real_dataset)
        self.shard_len = n // self.num_replicas if self.drop_last else -(-n // self.num_replicas)
        if self.shard_len == 0:
            raise ValueError(
                f"the real dataset has {n} items, fewer than num_replicas={self.num_replicas}: with drop_last=True no rank "
                "gets one; use drop_last=False (pads by repetition) or fewer replicas"
            )

        self._controller: Optional[AdaptiveRatio] = None
        self._changes: List[Tuple[int, int, Tuple[Fraction, ...]]] = []  # adaptive: (epoch, batch, shares) of each change
        self._plans: Dict[int, StretchPlan] = {}  # adaptive: each epoch's plan under the changes recorded so far
        self._setup_ratio(synthetic_ratio, classes)
        self.epoch = 0
        self._check_epoch(0)

        self._counters: Dict[str, float] = {name: 0 for name in _COUNTER_NAMES}
        self._counters.update({"epoch_" + name: 0 for name in _COUNTER_NAMES})
        self._served_keys = [f"served_group_{g}" for g in range(len(self._groups))]
        self._counters.update({key: 0 for key in self._served_keys})
        self._counters["waited_s"] = self._counters["epoch_waited_s"] = 0.0
        self._pool = SyntheticPool(
            mixed.cache,
            rank=self.cache_shard[0],
            world=self.cache_shard[1],
            n_groups=len(self._groups),
            max_serves=None if max_reuse is None else 1 + max_reuse,
            on_exhausted=on_exhausted,
            wait_timeout=self.wait_timeout,
            counters=self._counters,
            describe=_weak_method(self, "_describe"),
            publish=_weak_method(self, "_publish"),
            group_of=_weak_method(self, "_group_of"),
            before_map=mixed._refresh_label_names,
        )
        # a consumer that never reuses releases what the DataLoader has read at once; one that
        # reuses keeps served records until a writer asks for room
        self._keeps_served = on_exhausted == "reuse" and max_reuse != 0
        self._inflight: Deque[Tuple[int, int, int]] = deque()  # (ticket, lowest seq, synthetic items) per batch
        self._pos: Dict[str, Any] = {"epoch": 0, "batch": 0, "group_counts": [0] * len(self._groups)}
        self._resume_pending = False
        self._journal: Deque[Tuple[Dict[str, Any], List[tuple]]] = deque(maxlen=max(1, self.history))
        self._shards: Dict[int, np.ndarray] = {}
        self._offsets: Dict[int, int] = {0: 0}
        self._last_publish = -float("inf")
        self._published: Optional[Tuple[int, int, bool]] = None
        self._completed: set = set()
        self._warned_repeat = False
        self._epoch_hook = _EpochHook(self)

    # ------------------------------------------------------------------ ratio and classes
    def _setup_ratio(self, ratio: Ratio, classes: Optional[Sequence[Union[int, str]]]) -> None:
        self._schedule: Optional[Callable[[int], Any]] = None
        self._static: Optional[List[Fraction]] = None
        if isinstance(ratio, AdaptiveRatio):
            if classes is not None:
                raise ValueError("an AdaptiveRatio names its own classes; drop classes=[...]")
            resolved = [self.mixed.resolve_class(key, name="AdaptiveRatio classes") for key in ratio.classes]
            if len(set(resolved)) != len(resolved):
                raise ValueError(f"the AdaptiveRatio names a class twice (classes {ratio.classes})")
            most = ratio.max_total()
            if most > 1 or (most == 1 and self.batches_per_epoch is None):
                raise ValueError(
                    f"the AdaptiveRatio's classes can reach a synthetic ratio of {float(most):g} together ({len(resolved)} x its largest "
                    f"grid ratio {float(ratio.grid[-1]):g}); it must stay below 1 (at most 1 with batches_per_epoch): lower the grid"
                )
            self._groups = [(c,) for c in resolved]
            # the ratios the controller is at now (its start, unless it observed before this sampler existed)
            self._static = [as_fraction(r) for r in ratio.ratios().values()]
            self._controller = ratio
            aliases: Dict[Any, Any] = {}
            names = self.mixed.label_names or []
            for key, cls in zip(ratio.classes, resolved):
                aliases[cls] = aliases[str(cls)] = key
                if cls < len(names):
                    aliases[names[cls]] = key
            ratio._attach(self, aliases)
        elif isinstance(ratio, Mapping):
            if classes is not None:
                raise ValueError(
                    "give either classes=[...] (one ratio for those classes) or synthetic_ratio={class: ratio} "
                    "(a ratio per class), not both"
                )
            if not ratio:
                raise ValueError("synthetic_ratio is an empty dict; give {class: ratio} for at least one class")
            groups: List[Tuple[int, ...]] = []
            shares: List[Fraction] = []
            for key, value in ratio.items():
                cls = self.mixed.resolve_class(key, name="synthetic_ratio")
                share = as_fraction(value, name=f"synthetic_ratio[{key!r}]")
                if share <= 0:
                    raise ValueError(f"synthetic_ratio[{key!r}] must be > 0, got {value!r}; leave the class out instead")
                if any(cls in g for g in groups):
                    raise ValueError(f"synthetic_ratio names class {cls} twice (keys {list(ratio)})")
                groups.append((cls,))
                shares.append(share)
            self._groups = groups
            self._static = shares
        else:
            if classes is not None:
                if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
                    raise ValueError(f"classes must be a non-empty list of class indices or names, got {classes!r}")
                resolved = tuple(dict.fromkeys(self.mixed.resolve_class(c, name="classes") for c in classes))
                self._groups = [resolved]
            else:
                self._groups = [()]  # () = every class
            if callable(ratio):
                self._schedule = ratio
            else:
                self._static = [as_fraction(ratio)]
        self._group_index: Dict[int, int] = {c: g for g, cls in enumerate(self._groups) for c in cls}
        self._all_classes = self._groups == [()]

    def shares(self, epoch: Optional[int] = None) -> List[Fraction]:
        """The synthetic ratio of each class group at the start of ``epoch`` (default: the current one)."""
        if self._controller is not None:
            return list(self._shares_at(self.epoch if epoch is None else epoch, 0))
        if self._static is not None:
            return list(self._static)
        epoch = self.epoch if epoch is None else epoch
        return [as_fraction(self._schedule(epoch), name=f"synthetic_ratio({epoch})")]

    def ratio(self, epoch: Optional[int] = None) -> Fraction:
        """``r`` at ``epoch`` (default: the current one), as the exact fraction used."""
        return sum(self.shares(epoch), Fraction(0))

    # ------------------------------------------------------------------ adaptive ratio
    def _shares_at(self, epoch: int, batch: int) -> Tuple[Fraction, ...]:
        """The shares in force at ``(epoch, batch)``: those of the last change at or before it."""
        found: Tuple[Fraction, ...] = tuple(self._static or ())
        for e, b, shares in self._changes:
            if (e, b) <= (epoch, batch):
                found = shares
            else:
                break
        return found

    def _next_position(self) -> Tuple[int, int]:
        """``(epoch, batch)`` of the next batch this sampler yields (``batch`` may be the epoch's
        length: the next epoch's start)."""
        return int(self._pos["epoch"]), int(self._pos["batch"])

    def _record_change(self, where: Tuple[int, int], ratios: Mapping[Any, Fraction]) -> None:
        """The controller changed the ratios: they apply from batch ``where`` on."""
        shares = tuple(as_fraction(ratios[key]) for key in self._controller.classes)
        where = (int(where[0]), int(where[1]))
        if where < self._next_position():
            raise RuntimeError(f"a ratio change at (epoch, batch) {where} is behind this sampler's position {self._next_position()}")
        self._changes = [c for c in self._changes if (c[0], c[1]) != where] + [(where[0], where[1], shares)]
        self._changes.sort(key=lambda c: (c[0], c[1]))
        self._plans.clear()

    def changes(self) -> List[Dict[str, Any]]:
        """The ratio changes this sampler applied or will apply: ``epoch``, ``batch`` (the first
        batch at the new ratios), ``ratios`` per class index (adaptive ratio only; else empty)."""
        return [{"epoch": e, "batch": b, "ratios": {int(g[0]): float(r) for g, r in zip(self._groups, shares)}} for e, b, shares in self._changes]

    def _adaptive_plan(self, epoch: int) -> StretchPlan:
        cached = self._plans.get(epoch)
        if cached is not None:
            return cached
        first = self._shares_at(epoch, 0)
        changes = [(0, sum(first, Fraction(0)), first)]
        changes += [(b, sum(shares, Fraction(0)), shares) for e, b, shares in self._changes if e == epoch and b > 0]
        plan = plan_stretches(self.shard_len, self.batch_size, changes, drop_last=self.drop_last, batches_per_epoch=self.batches_per_epoch)
        if len(self._plans) > 8:
            self._plans.clear()
        self._plans[epoch] = plan
        return plan

    @staticmethod
    def _stretch(plan: Any, i: int, shares: Sequence[Fraction]) -> Tuple[int, EpochPlan, Sequence[Fraction]]:
        """``(first batch, plan, shares)`` of the stretch that holds batch ``i`` (``shares``:
        the epoch's, when the ratio does not change within it)."""
        if isinstance(plan, StretchPlan):
            start, sub, _, stretch_shares = plan.stretch(i)
            return start, sub, stretch_shares
        return 0, plan, shares

    def _check_epoch(self, epoch: int) -> Union[EpochPlan, StretchPlan]:
        if self._controller is not None:
            plan = self._adaptive_plan(epoch)
            if plan.num_batches == 0:
                raise ValueError(
                    f"no batch fits in epoch {epoch}: each rank's shard holds {self.shard_len} real items, and with batch_size="
                    f"{self.batch_size} at synthetic_ratio {float(plan.ratio):g} drop_last=True drops them all. Use drop_last=False "
                    "or a smaller batch_size"
                )
            return plan
        r = self.ratio(epoch)
        where = "synthetic_ratio" if self._schedule is None else f"synthetic_ratio({epoch}) (the schedule at epoch {epoch})"
        if r < 0:
            raise ValueError(f"{where} must be >= 0, got {float(r):g}")
        if r > 1:
            raise ValueError(f"{where} is {float(r):g}; a batch cannot hold more synthetic items than its size, so it must be <= 1")
        if r == 1 and self.batches_per_epoch is None:
            raise ValueError(
                f"{where} is 1: batches would hold no real item, so the epoch, which the real data defines, would never "
                "end; pass batches_per_epoch=N to fix the epoch length, or use a ratio below 1"
            )
        plan = plan_epoch(self.shard_len, self.batch_size, r, drop_last=self.drop_last, batches_per_epoch=self.batches_per_epoch)
        if plan.num_batches == 0:
            raise ValueError(
                f"no batch fits in an epoch: each rank's shard holds {self.shard_len} real items, and with batch_size="
                f"{self.batch_size} and synthetic_ratio={float(r):g} a full batch takes {float(self.batch_size * (1 - r)):g} "
                "of them on average; drop_last=True drops the rest. Use drop_last=False or a smaller batch_size"
            )
        return plan

    def _group_of(self, label: Label, seq: int) -> Optional[int]:
        mapped = label_class(self.mixed.map_label(label, seq=seq))  # a soft label: the class it was made for
        if self._all_classes:
            return 0
        if isinstance(mapped, tuple):
            found = [self._group_index[c] for c in mapped if c in self._group_index]
            return min(found) if found else None
        return self._group_index.get(mapped)

    def _describe(self, g: int) -> str:
        text = f"consumer {self.consumer!r} (rank {self.rank} of {self.num_replicas})"
        if self._groups[g]:
            text += f", class{'es' if len(self._groups[g]) > 1 else ''} {list(self._groups[g])}"
        return text

    # ------------------------------------------------------------------ epochs and real indices
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields. Setting the epoch a loaded state was in
        keeps that state's position (so a resumed training loop may call it as usual)."""
        epoch = _int_arg(epoch, "epoch", 0)
        self._check_epoch(epoch)
        self.epoch = epoch
        if epoch != self._pos["epoch"]:
            self._pos = {"epoch": epoch, "batch": 0, "group_counts": [0] * len(self._groups)}
            self._resume_pending = False

    @property
    def sampler(self) -> "_EpochHook":
        """An object whose ``set_epoch`` calls this sampler's: PyTorch Lightning (and other tools
        written for ``torch.utils.data.BatchSampler``) call ``batch_sampler.sampler.set_epoch``
        each epoch, so they drive this sampler's epochs without extra code."""
        return self._epoch_hook

    def plan(self, epoch: Optional[int] = None) -> Union[EpochPlan, StretchPlan]:
        """The composition of every batch of ``epoch`` (default: the current one) on this rank: an
        :class:`EpochPlan`, or with an adaptive ratio a :class:`StretchPlan` under the changes
        recorded so far."""
        return self._check_epoch(self.epoch if epoch is None else epoch)

    def __len__(self) -> int:
        """Batches in the current epoch (a resumed epoch counts all of them)."""
        return self.plan().num_batches

    def _shard(self, key: int) -> np.ndarray:
        """This rank's real indices for epoch (or pass) ``key``."""
        shard = self._shards.get(key)
        if shard is None:
            n = len(self.mixed.real_dataset)
            order = np.random.default_rng([self.seed, key]).permutation(n) if self.shuffle else np.arange(n)
            total = self.shard_len * self.num_replicas
            order = np.resize(order, total) if total > n else order[:total]  # np.resize repeats from the start
            shard = order[self.rank :: self.num_replicas]
            if len(self._shards) >= 2:
                self._shards.pop(next(iter(self._shards)))
            self._shards[key] = shard
        return shard

    def _stream_offset(self, epoch: int) -> int:
        """Real items used by epochs before ``epoch`` (``batches_per_epoch`` mode)."""
        known = max(e for e in self._offsets if e <= epoch)
        offset = self._offsets[known]
        for e in range(known, epoch):
            offset += self._check_epoch(e).real_items
            self._offsets[e + 1] = offset
        return offset

    def _real_indices(self, plan: EpochPlan, epoch: int, i: int) -> List[int]:
        count = plan.real_in(i)
        if not count:
            return []
        start = plan.real_before(i)
        if not plan.fixed_length:
            return self._shard(epoch)[start : start + count].tolist()
        out: List[int] = []
        pos = self._stream_offset(epoch) + start
        while len(out) < count:
            p, within = divmod(pos, self.shard_len)
            take = min(count - len(out), self.shard_len - within)
            out += self._shard(p)[within : within + take].tolist()
            pos += take
        return out

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        epoch = self.epoch
        plan = self._check_epoch(epoch)
        shares = self.shares(epoch)
        if self._resume_pending and self._pos["epoch"] == epoch:
            start, group_counts = self._pos["batch"], list(self._pos["group_counts"])
        else:
            start, group_counts = 0, [0] * len(self._groups)
            for name in _COUNTER_NAMES:
                self._counters["epoch_" + name] = 0
            if epoch in self._completed and not self._warned_repeat:
                self._warned_repeat = True
                warnings.warn(
                    f"RatioBatchSampler: epoch {epoch} starts again with the same real order; call "
                    "sampler.set_epoch(epoch) before each epoch (warned once)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._resume_pending = False
        self._pos = {"epoch": epoch, "batch": start, "group_counts": list(group_counts)}
        self._journal.clear()
        pool = self._pool
        # A new iteration starts once the DataLoader is done with the last one (every batch of
        # it delivered, or the iterator dropped): nothing of it is in flight any more.
        self._inflight.clear()
        self._publish(force=True)  # register (or refresh) this consumer's hold before drawing
        stride = self.cache_shard[1]
        i = start - 1
        while True:
            i += 1
            if self._controller is not None:
                plan = self._check_epoch(epoch)  # a change recorded since the last batch re-plans the rest of the epoch
            if i >= plan.num_batches:
                break
            s_start, s_plan, s_shares = self._stretch(plan, i, shares)
            if i == s_start:
                group_counts = [0] * len(self._groups)  # per-class slots are split from each stretch's start
            before = {"epoch": epoch, "batch": i, "group_counts": list(group_counts), "counters": dict(self._counters)}
            carried: List[tuple] = []  # scans made while waiting belong to the batch's journal
            while True:
                ops: List[tuple] = list(carried)
                pool.ops = ops
                pool.drawn = []
                counts = list(before["group_counts"])
                try:
                    batch: List[Any] = self._real_indices(plan, epoch, i)
                    n_real = len(batch)
                    k = plan.synthetic_in(i)
                    if k:
                        rng = random.Random(f"synthaug.mixing:{self.seed}:{epoch}:{i}:{self.rank}")
                        per_group = split_by_deficit(k, s_shares, self.batch_size, min(i - s_start, s_plan.full_batches), counts)
                        ticket = self.mixed._new_ticket()
                        for g, demand in enumerate(per_group):
                            if demand:
                                batch += [SyntheticIndex(s, pool.label_of(s), stride=stride, ticket=ticket) for s in pool.draw(g, demand, rng)]
                                self._counters[self._served_keys[g]] += demand
                        self._inflight.append((ticket, min(pool.drawn), k))
                        if len(self._inflight) > _INFLIGHT_MAX:
                            self._inflight.popleft()
                except NeedRecords as need:
                    # undo the draws (they must not pin a full cache), wait, draw the batch again
                    self._rollback(before, ops)
                    pool.drawn = []
                    carried = []
                    pool.ops = carried
                    try:
                        pool.wait_for(need)
                    except BaseException:
                        self._undo_live(carried)
                        raise
                    finally:
                        pool.ops = None
                    continue
                except BaseException:
                    self._rollback(before, ops)
                    raise
                finally:
                    pool.ops = None
                    pool.drawn = []
                break
            group_counts = counts
            self._bump("real", n_real)
            self._journal.append((before, ops))
            self._pos = {"epoch": epoch, "batch": i + 1, "group_counts": list(group_counts)}
            self._publish()
            yield batch
        self._completed.add(epoch)
        self._publish(force=True)

    def _undo_live(self, ops: List[tuple]) -> None:
        """Revert ``ops`` on the live pool."""
        live = {"scan_pos": self._pool.scan_pos, "pending": self._pool.pending, "buckets": self._pool.buckets}
        SyntheticPool.undo(live, ops)
        self._pool.scan_pos = live["scan_pos"]

    def _rollback(self, before: Dict[str, Any], ops: List[tuple]) -> None:
        """Undo a batch that failed half-way (e.g. a wait that timed out), so the state stays exact."""
        self._undo_live(ops)
        waited = self._counters["waited_s"] - before["counters"]["waited_s"]
        self._counters.update(before["counters"])
        self._bump("waited_s", waited)  # the time was spent all the same

    def _bump(self, name: str, by: float) -> None:
        self._counters[name] += by
        self._counters["epoch_" + name] += by

    def _inflight_min(self) -> Optional[int]:
        """The lowest seq of the batches the DataLoader has not read yet (``None``: none)."""
        lowest = None
        inflight = self._inflight
        while inflight and self.mixed._was_read(inflight[0][0], inflight[0][2]):
            inflight.popleft()
        for ticket, low, n in inflight:
            if (lowest is None or low < lowest) and not self.mixed._was_read(ticket, n):
                lowest = low
        return lowest

    def _hold_target(self, cursor: int) -> int:
        """How far this consumer may release now: never past its cursor (records not handed out
        yet), a record in flight, or one drawn for the batch being built; a consumer that
        reuses keeps its served records until a writer asks for room (``evict_request``)."""
        pool = self._pool
        cap = cursor
        for low in (self._inflight_min(), min(pool.drawn, default=None)):
            if low is not None and low < cap:
                cap = low
        want = max(pool.hold, pool.request) if self._keeps_served else cap
        return max(pool.hold, min(cap, want))

    def _publish(self, force: bool = False) -> None:
        """Write the cursor and hold to the cache's cursor table when they changed: at once when
        forced or when a writer waits for records this consumer may release, else at most every
        ``cursor_interval`` seconds. The pool draws nothing below the new hold from then on."""
        cache = self.mixed.cache
        if cache.readonly:
            return
        pool = self._pool
        now = time.monotonic()
        due = now - self._last_publish >= self.cursor_interval
        asked = pool.request > pool.hold  # a writer waits for records this consumer holds
        if not (force or due or asked):
            return  # the common case, once per batch: nothing to work out
        cursor = pool.cursor()
        hold = self._hold_target(cursor)
        urgent = asked and hold > pool.hold
        if not (force or urgent or (due and (cursor, hold, pool.waiting) != self._published)):
            return
        self._last_publish = now
        cache.set_cursor(
            self.consumer,
            cursor,
            hold=hold,
            waiting=pool.waiting,
            rank=self.rank,
            num_replicas=self.num_replicas,
            epoch=self._pos["epoch"],
            batch=self._pos["batch"],
            served=int(self._counters["served"]),
            ratios=self._class_ratios(),
            served_by_class=self._served_by_class(),
        )
        pool.hold = hold
        self._published = (cursor, hold, pool.waiting)

    def _class_ratios(self) -> Dict[str, float]:
        """The synthetic ratio per class index now (``"*"``: any class), as published in the
        cursor table for generation workers that split their supply by demand."""
        epoch, batch = self._next_position()
        shares = self._shares_at(epoch, batch) if self._controller is not None else self.shares(epoch)
        out: Dict[str, float] = {}
        for group, share in zip(self._groups, shares):
            if not group:
                out["*"] = float(share)
            for c in group:
                out[str(c)] = float(share) / len(group)
        return out

    def _served_by_class(self) -> Dict[str, int]:
        """Synthetic items served per class group (``"*"``: any class; a group of several classes
        is named by its classes joined with "+")."""
        return {("+".join(str(c) for c in group) or "*"): int(self._counters[self._served_keys[g]]) for g, group in enumerate(self._groups)}

    def close(self) -> None:
        """Remove this consumer's cursor from the cache: writers stop keeping records for it
        (its hold) and stop counting records as unseen by it. Call it when training with this
        sampler is over but the process goes on; iterating again registers it anew."""
        cache = self.mixed.cache
        if not cache.readonly:
            cache.remove_cursor(self.consumer)
        self._published = None

    # ------------------------------------------------------------------ counters and state
    def stats(self) -> Dict[str, Any]:
        """Counters for logging, readable at any time (rule 7).

        Keys: ``served`` (synthetic items handed out), ``fresh``, ``reused``, ``waited_s``
        (seconds blocked waiting for records), ``real`` (real items), ``synthetic_share``
        (served / (served + real)), ``evicted_unseen`` (fresh records evicted before this
        consumer got to them), ``corrupt_skipped`` (records whose header could not be read),
        the same with an ``epoch_`` prefix for the current epoch, and ``epoch``, ``batch`` (the
        next batch of the epoch), ``cursor``, ``hold`` (the oldest record it may still read, as
        last published), ``consumer``. Every value is a number or a string (log them as scalars);
        the per-class view is :meth:`class_stats`.
        """
        c = self._counters
        out: Dict[str, Any] = {"consumer": self.consumer, "epoch": self._pos["epoch"], "batch": self._pos["batch"]}
        out["cursor"] = self._pool.cursor()
        out["hold"] = self._pool.hold
        for prefix in ("", "epoch_"):
            for name in _COUNTER_NAMES:
                v = c[prefix + name]
                out[prefix + name] = float(v) if name == "waited_s" else int(v)
            total = c[prefix + "served"] + c[prefix + "real"]
            out[prefix + "synthetic_share"] = c[prefix + "served"] / total if total else 0.0
        return out

    def class_stats(self) -> Dict[str, Any]:
        """Per class: ``served_by_class`` (synthetic items served per class group, ``"*"`` for any
        class), ``ratios`` (the ratio per class index now); with an adaptive ratio also
        ``ratio_changes`` (:meth:`changes`) and ``controller`` (the controller's ``stats()``)."""
        out: Dict[str, Any] = {"served_by_class": self._served_by_class(), "ratios": self._class_ratios()}
        if self._controller is not None:
            out["ratio_changes"] = self.changes()
            out["controller"] = self._controller.stats()
        return out

    def freshness(self) -> Dict[str, Any]:
        """How fresh the synthetic items this sampler handed out were (all epochs so far).

        Keys: ``served``, ``fresh`` (first serves; also ``distinct_served``, the distinct records
        served), ``reused``, ``fresh_share`` (fresh / served), ``mean_serves_per_image`` (served /
        distinct), ``serve_histogram`` (``{times served: records}`` over the records this sampler
        may still reuse; records that reached ``max_reuse`` are not in it, evicted ones until
        the sampler next tries to reuse them),
        ``max_reuse`` and ``waited_s``. A fresh share below what you want means the generator is
        slower than the trainer's synthetic draws: see the README's freshness rule.
        """
        c = self._counters
        served, fresh = int(c["served"]), int(c["fresh"])
        hist: Dict[int, int] = {}
        for buckets in self._pool.buckets:
            for count, seqs in buckets.items():
                if seqs:
                    hist[int(count)] = hist.get(int(count), 0) + len(seqs)
        return {
            "served": served,
            "fresh": fresh,
            "reused": int(c["reused"]),
            "distinct_served": fresh,
            "fresh_share": fresh / served if served else None,
            "mean_serves_per_image": served / fresh if fresh else None,
            "serve_histogram": dict(sorted(hist.items())),
            "max_reuse": self.max_reuse,
            "waited_s": float(c["waited_s"]),
        }

    def _config(self) -> Dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "cache_shard": list(self.cache_shard),
            "real_len": len(self.mixed.real_dataset),
            "groups": [list(g) for g in self._groups],
            "batches_per_epoch": self.batches_per_epoch,
            "ratio": None if self._static is None or self._controller is not None else [str(s) for s in self._static],
            "adaptive": self._controller is not None,
            "max_reuse": self.max_reuse,
        }

    def state_dict(self, *, consumed: Optional[int] = None) -> Dict[str, Any]:
        """Everything an exact resume needs (rule 6): epoch, batches yielded in it, the group
        counts, the pool (scan position, scanned-but-unserved records, serve counts), counters
        and the configuration it belongs to. The RNG needs no state: each batch seeds its own
        from ``(seed, epoch, batch, rank)``.

        Args:
            consumed: batches of the current epoch the training loop has received. A DataLoader
                fetches ahead (up to ``num_workers × prefetch_factor`` batches), so the sampler
                has yielded more than the loop has seen; pass the loop's count and the state is
                rewound (through the undo journal, at most ``history`` batches) to just after the
                last consumed batch, so the prefetched ones are yielded again after a resume.
                ``None``: everything yielded counts as consumed.
        """
        pos = self._pos
        pool_state = self._pool.state()
        counters = dict(self._counters)
        if consumed is not None:
            consumed = _int_arg(consumed, "consumed", 0)
            back = pos["batch"] - consumed
            if back < 0:
                raise ValueError(f"consumed={consumed}, but only {pos['batch']} batches of epoch {pos['epoch']} were yielded")
            if back > len(self._journal) or (back and self._journal[-back][0]["epoch"] != pos["epoch"]):
                raise ValueError(
                    f"cannot rewind {back} batches: the undo journal holds {len(self._journal)} of this iteration "
                    f"(history={self.history}); raise history or take the state closer to the loop"
                )
            if back:
                pool_state["pending"] = [deque(p) for p in pool_state["pending"]]
                pool_state["buckets"] = [{c: list(v) for c, v in b.items()} for b in self._pool.buckets]
                entries = list(self._journal)[-back:]
                for _before, ops in reversed(entries):
                    SyntheticPool.undo(pool_state, ops)
                before = entries[0][0]
                pos = {"epoch": before["epoch"], "batch": before["batch"], "group_counts": before["group_counts"]}
                counters = dict(before["counters"])
                pool_state["pending"] = [list(p) for p in pool_state["pending"]]
                pool_state["buckets"] = [{c: v for c, v in b.items() if v} for b in pool_state["buckets"]]
        state = {
            "format": _STATE_FORMAT,
            "epoch": pos["epoch"],
            "batch": pos["batch"],
            "group_counts": list(pos["group_counts"]),
            "pool": pool_state,
            "counters": counters,
            "consumer": self.consumer,
            "config": self._config(),
        }
        if self._controller is not None:
            # every change, also those at batches the rewind above gives back: the loop made the
            # observations behind them before this state was taken, and will not make them again
            state["adaptive"] = {"start": [str(x) for x in self._static], "changes": [[e, b, [str(x) for x in shares]] for e, b, shares in self._changes],
                                 "controller": self._controller.state_dict()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next iteration continues the saved epoch at the saved
        batch (``set_epoch`` with the saved epoch keeps it).

        Raises:
            ValueError: the state is of another format, or was saved by a sampler configured
                differently (batch size, seed, replicas, rank, real length, classes, ratio, ...).
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a RatioBatchSampler state (format {_STATE_FORMAT}): {type(state).__name__}")
        mine = self._config()
        theirs = state["config"]
        for key, value in mine.items():
            if key == "ratio" and (value is None or theirs.get(key) is None):
                continue
            if key == "cache_shard" and key not in theirs:  # saved before cache_shard existed: the default
                theirs = {**theirs, key: [theirs.get("rank"), theirs.get("num_replicas")]}
            if key == "adaptive" and key not in theirs:  # saved before adaptive ratios existed
                theirs = {**theirs, key: False}
            if theirs.get(key) != value:
                raise ValueError(
                    f"the state was saved by a sampler with {key}={theirs.get(key)!r}, this one has {key}={value!r}; "
                    "resume with the same settings"
                )
        epoch = int(state["epoch"])
        if self._controller is not None:
            adaptive = state["adaptive"]
            self._controller.load_state_dict(adaptive["controller"])
            self._static = [Fraction(x) for x in adaptive["start"]]  # the ratios before the first change, as saved
            self._changes = [(int(e), int(b), tuple(Fraction(x) for x in shares)) for e, b, shares in adaptive["changes"]]
            self._plans.clear()
            self._offsets = {0: 0}
        self._check_epoch(epoch)
        self._pool.load(state["pool"])
        self._counters.update({k: v for k, v in state["counters"].items() if k in self._counters})
        self.epoch = epoch
        self._pos = {"epoch": epoch, "batch": int(state["batch"]), "group_counts": [int(c) for c in state["group_counts"]]}
        self._resume_pending = True
        self._journal.clear()

    def __repr__(self) -> str:
        ratio = "schedule" if self._schedule is not None else "adaptive" if self._controller is not None else str(self.ratio(self.epoch))
        return (
            f"RatioBatchSampler(batch_size={self.batch_size}, synthetic_ratio={ratio}, rank={self.rank}/{self.num_replicas}, "
            f"consumer={self.consumer!r}, epoch={self.epoch})"
        )


class _EpochHook:
    """``RatioBatchSampler.sampler``: forwards ``set_epoch`` to the batch sampler."""

    def __init__(self, owner: RatioBatchSampler) -> None:
        self._owner = weakref.ref(owner)

    def set_epoch(self, epoch: int) -> None:
        self._owner().set_epoch(epoch)

    def __repr__(self) -> str:
        return f"<set_epoch hook of {self._owner()!r}>"


def _weak_method(owner: Any, name: str, **kwargs: Any) -> Callable:
    """``owner.<name>(*args, **kwargs)`` through a weak reference.

    The pool calls back into its sampler; strong references would make a cycle, and a cycle is
    freed by the garbage collector at an arbitrary moment — possibly inside another cache's read
    transaction — rather than when the last reference goes.
    """
    ref = weakref.ref(owner)

    def call(*args: Any) -> Any:
        return getattr(ref(), name)(*args, **kwargs)

    return call
