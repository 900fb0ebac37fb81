"""Exact batch composition (docs/DESIGN.md, mixing rules 1 and 2): ratios as fractions, the synthetic
count of each batch, and how many batches an epoch holds.

Notation (as in docs/DESIGN.md): ``B`` batch size, ``r`` the synthetic ratio read as the nearest fraction
with denominator at most 10**6, ``q = r·B``, ``N`` the length of this rank's shard of real indices.
Everything here is integer arithmetic on ``r = a / b``; no float is ever rounded.

* Batch ``i`` (from 0) holds ``k_i = floor(q·(i+1)) − floor(q·i)`` synthetic and ``B − k_i`` real
  items, so after ``n`` batches ``floor(q·n)`` synthetic and ``R(n) = n·B − floor(q·n)`` real
  items have been used.
* Without ``batches_per_epoch`` the real shard defines the epoch: ``n_full = floor(N / (B − q))``
  full batches fit (``R(n) <= N`` exactly when ``n <= N / (B − q)``, because
  ``R(n) = n·(B − q) + frac(q·n)``), leaving ``L = N − R(n_full)`` real items, ``0 <= L < B``.
  When ``L > 0`` and not ``drop_last``, one last, shorter batch holds those ``L`` real items and
  ``floor(L·r / (1 − r))`` synthetic ones (the most that keeps its share at or below ``r``; it
  always fits: ``L < B − q`` so ``L / (1 − r) < B``). With ``drop_last`` those ``L`` items are
  left out of this epoch.
* With ``batches_per_epoch = n`` every batch is full and the epoch holds exactly ``n`` batches;
  ``r = 1`` is then allowed (all-synthetic batches). ``r > 1`` is always refused.
* A ratio that changes during an epoch (an adaptive controller, :mod:`synthaug.mixing.adaptive`)
  splits the epoch into *stretches*: stretch ``j`` starts at batch ``s_j`` with ratio ``r_j`` and
  is planned as an epoch of its own over the real items still unused, ``N − R(s_j)``; batch
  ``i`` of it holds ``floor(q_j·(i − s_j + 1)) − floor(q_j·(i − s_j))`` synthetic items
  (:func:`plan_stretches`). A change at or after the batch where the epoch ends applies to the
  next epoch.
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, List, Optional, Sequence

__all__ = ["MAX_DENOMINATOR", "EpochPlan", "StretchPlan", "as_fraction", "plan_epoch", "plan_stretches", "split_by_deficit"]

MAX_DENOMINATOR = 10**6


def as_fraction(value: Any, *, name: str = "synthetic_ratio") -> Fraction:
    """``value`` read as the nearest fraction with denominator <= 10**6 (0.3 -> 3/10).

    Raises:
        ValueError: for a bool, a non-number, NaN or an infinity (naming ``name``).
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Rational, numbers.Real)):
        raise ValueError(f"{name} must be a number (e.g. 0.25 or Fraction(1, 4)), got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Rational) and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, numbers.Rational):
        frac = Fraction(int(value.numerator), int(value.denominator))
    else:
        frac = Fraction(float(value))
    return frac.limit_denominator(MAX_DENOMINATOR)


@dataclass(frozen=True)
class EpochPlan:
    """The composition of every batch of one epoch on one rank.

    Attributes:
        batch_size: ``B``.
        ratio: ``r`` as a fraction.
        shard_len: ``N``, real indices of this rank's shard (per pass, with ``batches_per_epoch``).
        full_batches: batches of exactly ``B`` items.
        last_real, last_synthetic: the last, shorter batch (both 0 when there is none).
        num_batches: ``full_batches`` plus one when there is a shorter last batch.
        fixed_length: ``True`` when ``batches_per_epoch`` set the length.
    """

    batch_size: int
    ratio: Fraction
    shard_len: int
    full_batches: int
    last_real: int
    last_synthetic: int
    num_batches: int
    fixed_length: bool

    def synthetic_before(self, i: int) -> int:
        """Synthetic items in full batches ``0 .. i-1``: ``floor(q·i)``."""
        return (self.ratio.numerator * self.batch_size * i) // self.ratio.denominator

    def real_before(self, i: int) -> int:
        """Real items in batches ``0 .. i-1`` (``i <= num_batches``)."""
        if i <= self.full_batches:
            return i * self.batch_size - self.synthetic_before(i)
        return self.real_before(self.full_batches) + self.last_real

    def synthetic_in(self, i: int) -> int:
        """``k_i``: synthetic items in batch ``i``."""
        if i < self.full_batches:
            return self.synthetic_before(i + 1) - self.synthetic_before(i)
        return self.last_synthetic

    def real_in(self, i: int) -> int:
        if i < self.full_batches:
            return self.batch_size - self.synthetic_in(i)
        return self.last_real

    @property
    def real_items(self) -> int:
        return self.real_before(self.num_batches)

    @property
    def synthetic_items(self) -> int:
        return self.synthetic_before(self.full_batches) + self.last_synthetic


def plan_epoch(
    shard_len: int,
    batch_size: int,
    ratio: Fraction,
    *,
    drop_last: bool,
    batches_per_epoch: Optional[int] = None,
) -> EpochPlan:
    """How many batches an epoch holds and what each holds (see the module docstring)."""
    a, b = ratio.numerator, ratio.denominator
    if batches_per_epoch is not None:
        return EpochPlan(batch_size, ratio, shard_len, batches_per_epoch, 0, 0, batches_per_epoch, True)
    if a >= b:
        raise ValueError(f"synthetic_ratio={ratio} >= 1 needs batches_per_epoch")
    # n_full = floor(N / (B - q)) with q = a·B/b  ->  floor(N·b / (B·(b − a)))
    full = (shard_len * b) // (batch_size * (b - a))
    used = full * batch_size - (a * batch_size * full) // b
    last_real = shard_len - used
    last_syn = (last_real * a) // (b - a) if last_real else 0
    if drop_last or last_real == 0:
        return EpochPlan(batch_size, ratio, shard_len, full, 0, 0, full, False)
    return EpochPlan(batch_size, ratio, shard_len, full, last_real, last_syn, full + 1, False)


@dataclass(frozen=True)
class StretchPlan:
    """The composition of one epoch whose ratio changes at batch boundaries (module docstring).

    Attributes:
        stretches: ``(start batch, EpochPlan of the rest of the epoch at that stretch's ratio,
            real items used before it, shares)`` for each stretch that the epoch reaches.
        num_batches, fixed_length: as for :class:`EpochPlan`.
    """

    batch_size: int
    shard_len: int
    stretches: tuple
    num_batches: int
    fixed_length: bool

    def stretch(self, i: int) -> tuple:
        """``(start, plan, real_before_start, shares)`` of the stretch holding batch ``i``."""
        if len(self.stretches) == 1:
            return self.stretches[0]
        return self.stretches[max(0, bisect.bisect_right(self.starts, i) - 1)]

    @property
    def starts(self) -> tuple:
        cached = self.__dict__.get("_starts")
        if cached is None:
            cached = tuple(entry[0] for entry in self.stretches)
            object.__setattr__(self, "_starts", cached)
        return cached

    @property
    def ratio(self) -> Fraction:
        """The ratio at the epoch's start."""
        return self.stretches[0][1].ratio

    def synthetic_in(self, i: int) -> int:
        start, plan, _, _ = self.stretch(i)
        return plan.synthetic_in(i - start)

    def real_in(self, i: int) -> int:
        start, plan, _, _ = self.stretch(i)
        return plan.real_in(i - start)

    def real_before(self, i: int) -> int:
        start, plan, used, _ = self.stretch(i)
        return used + plan.real_before(i - start)

    def synthetic_before(self, i: int) -> int:
        total = 0
        for j, (start, plan, _, _) in enumerate(self.stretches):
            end = self.stretches[j + 1][0] if j + 1 < len(self.stretches) else self.num_batches
            upto = min(i, end)
            if upto <= start:
                break
            n = upto - start
            total += plan.synthetic_before(min(n, plan.full_batches)) + (plan.last_synthetic if n > plan.full_batches else 0)
        return total

    @property
    def real_items(self) -> int:
        return self.real_before(self.num_batches)

    @property
    def synthetic_items(self) -> int:
        return self.synthetic_before(self.num_batches)


def plan_stretches(
    shard_len: int,
    batch_size: int,
    changes: Sequence[tuple],
    *,
    drop_last: bool,
    batches_per_epoch: Optional[int] = None,
) -> StretchPlan:
    """Plan an epoch whose ratio changes: ``changes`` are ``(start batch, ratio, shares)``,
    sorted by start, the first at batch 0. A stretch starting at or after the batch where the
    epoch ends (under the ratios before it) is not reached in this epoch."""
    stretches = []
    used = 0
    num = 0
    for j, (start, ratio, shares) in enumerate(changes):
        if j and start >= num:
            break  # the epoch ended before this change
        rest = None if batches_per_epoch is None else batches_per_epoch - start
        plan = plan_epoch(shard_len - used, batch_size, ratio, drop_last=drop_last, batches_per_epoch=rest)
        stretches.append((start, plan, used, tuple(shares)))
        num = start + plan.num_batches
        if j + 1 < len(changes):
            nxt = changes[j + 1][0]
            if nxt < num:
                used += plan.real_before(nxt - start)
    return StretchPlan(batch_size, shard_len, tuple(stretches), num, batches_per_epoch is not None)


def split_by_deficit(k: int, shares: Sequence[Fraction], batch_size: int, batch_index: int, counts: List[int]) -> List[int]:
    """Split ``k`` synthetic slots of batch ``batch_index`` among classes with ratios ``shares``.

    Each slot goes to the class furthest below its running target ``r_c·B·(i+1)`` given the
    cumulative ``counts`` of this epoch (updated in place); ties go to the earlier class. Returns
    the slots per class. Integer arithmetic on a common denominator.
    """
    if len(shares) == 1:
        counts[0] += k
        return [k]
    den = 1
    for s in shares:
        den = den * s.denominator // math.gcd(den, s.denominator)
    targets = [s.numerator * (den // s.denominator) * batch_size * (batch_index + 1) for s in shares]
    out = [0] * len(shares)
    for _ in range(k):
        best, best_deficit = 0, None
        for g, t in enumerate(targets):
            deficit = t - counts[g] * den
            if best_deficit is None or deficit > best_deficit:
                best, best_deficit = g, deficit
        counts[best] += 1
        out[best] += 1
    return out
