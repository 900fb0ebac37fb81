"""Supply follows demand: which class a worker serving several classes makes next.

A worker with a generator per class (:class:`~synthaug.generation.multi.MultiAdapterGenerator`)
keeps each class's fresh count in proportion to what the consumers draw of it, so no class starves
while another overflows.

**Demand.** Each class ``c`` (label ``l_c``) gets a weight ``w_c``: the sum, over the live
consumers' cursors (:meth:`SyntheticCache.cursors`), of ``cursor["ratios"][str(l_c)]``, the
consumer's current synthetic ratio of that class (written by ``RatioBatchSampler``; the key
``"*"``, "any class", states no preference and is ignored, as is a cursor without ``ratios``).
When no live cursor names any of the worker's classes, the weights are the worker's own
``demand=`` (e.g. ``{"Shirt": 2, "Coat": 1}``), else equal.

**Targets.** Class ``c`` should keep ``target_c = min_fresh · w_c / Σ w`` fresh records (records
of its label at or after the smallest live cursor: :class:`ClassTally`). Its *relative deficit*
is ``(target_c - fresh_c) / target_c``.

**Choice.** A consumer that is waiting (its cursor's ``waiting`` flag) is served first: among the
classes it draws (its ``ratios`` > 0; every class of the worker when it names none, or the class
indices a non-boolean ``waiting`` lists), the one with the largest relative deficit, deficit or
not. Otherwise the class with the largest relative deficit among those below their target (ties:
the order of the classes); none below target: nothing to make. A batch is at most the worker's
``batch_size``, so each class ends within one batch of its target.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

__all__ = ["ANY_CLASS", "ClassTally", "DemandPlan", "class_weights", "plan_class", "served_by_class"]

#: the ``ratios`` key of a consumer that draws synthetic records of any class
ANY_CLASS = "*"


class ClassTally:
    """The sequence numbers of the stored records of each label a worker serves, kept up to date
    by reading only the records appended since the last :meth:`update` (one read transaction,
    :meth:`SyntheticCache.scan_classes`). A relabel of the cache makes it read everything again.

    Args:
        labels: the labels to count (a multi-label record counts under each of its labels).
    """

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = [int(lab) for lab in labels]
        self._seqs: Dict[int, List[int]] = {lab: [] for lab in self.labels}
        self._next = 0  # first seq not read yet
        self._relabels: Optional[int] = None
        self.first_seq = 0
        self.scanned = 0  # records read, all updates together (what the tally has cost)

    def _reset(self) -> None:
        self._seqs = {lab: [] for lab in self.labels}
        self._next = 0

    def update(self, cache) -> Dict[str, Any]:
        """Read what was appended since the last call; returns the scan (supply and cursors included)."""
        scan = cache.scan_classes(self._next)
        if scan["relabeling"] or (self._relabels is not None and scan["relabels"] != self._relabels):
            self._reset()
            scan = cache.scan_classes(0)
        self._relabels = scan["relabels"]
        self.scanned += len(scan["seqs"])
        for seq, cls in zip(scan["seqs"], scan["classes"]):
            for lab in cls if isinstance(cls, tuple) else (cls,):
                seqs = self._seqs.get(lab)
                if seqs is not None and (not seqs or seq > seqs[-1]):
                    seqs.append(seq)
        supply = scan["supply"]
        self._next = max(self._next, supply["next_seq"])
        self.first_seq = supply["first_seq"]
        for lab, seqs in self._seqs.items():  # forget evicted records once they pile up
            gone = bisect.bisect_left(seqs, self.first_seq)
            if gone > 1024 and gone * 2 > len(seqs):
                del seqs[:gone]
        return scan

    def fresh(self, label: int, handed: int) -> int:
        """Stored records of ``label`` at or after ``handed`` (the smallest live cursor; 0: all)."""
        seqs = self._seqs.get(int(label), [])
        return len(seqs) - bisect.bisect_left(seqs, max(int(handed), self.first_seq))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def class_weights(cursors: Mapping[str, Mapping[str, Any]], labels: Mapping[str, int],
                  demand: Optional[Mapping[str, float]] = None) -> "tuple[Dict[str, float], str]":
    """Each class's demand weight and where it came from: ``"cursors"``, ``"demand"`` or ``"equal"``
    (module docstring)."""
    weights = {name: 0.0 for name in labels}
    named = False
    for cur in cursors.values():
        ratios = cur.get("ratios")
        if not isinstance(ratios, Mapping):
            continue
        for name, lab in labels.items():
            r = _number(ratios.get(str(lab)))
            if r is not None and r >= 0:  # a class at ratio 0 (an adaptive grid may hold 0) is named, with no weight
                weights[name] += r
                named = True
    if named:
        return weights, "cursors"
    if demand:
        return {name: float(demand.get(name, 0.0)) for name in labels}, "demand"
    return {name: 1.0 for name in labels}, "equal"


def _waiting_for(cursors: Mapping[str, Mapping[str, Any]], labels: Mapping[str, int]) -> Optional[Set[str]]:
    """The classes waiting consumers draw (``None``: nobody waits)."""
    by_label = {str(lab): name for name, lab in labels.items()}
    wanted: Optional[Set[str]] = None
    for cur in cursors.values():
        waiting = cur.get("waiting")
        if not waiting:
            continue
        wanted = wanted if wanted is not None else set()
        if not isinstance(waiting, bool):  # class indices, where a consumer says which
            items = waiting if isinstance(waiting, (list, tuple)) else [waiting]
            wanted.update(by_label[str(i)] for i in items if str(i) in by_label)
            continue
        ratios = cur.get("ratios")
        named = set()
        if isinstance(ratios, Mapping):
            named = {by_label[k] for k, v in ratios.items() if k in by_label and (_number(v) or 0) > 0}
        if named:
            wanted.update(named)
        elif not (isinstance(ratios, Mapping) and any(k != ANY_CLASS for k in ratios)):
            wanted.update(labels)  # no preference (no ratios, or only "*"): any of ours will do
    return wanted


def served_by_class(cursors: Mapping[str, Mapping[str, Any]], label: int) -> Optional[int]:
    """Synthetic records of ``label`` served, summed over the live cursors that count them
    (``served_by_class``); ``None`` when no cursor does."""
    total, seen = 0, False
    for cur in cursors.values():
        by_class = cur.get("served_by_class")
        if isinstance(by_class, Mapping):
            seen = True
            total += int(by_class.get(str(label), 0) or 0)
    return total if seen else None


@dataclass
class DemandPlan:
    """The demand rule's view of one moment.

    Attributes:
        choice: the class to make next (``None``: every class at its target, nobody waiting).
        reason: ``"waiting"``, ``"deficit"`` or ``None``.
        weights, source: :func:`class_weights`; ``targets``: fresh records each class should keep;
        fresh: fresh records of each class.
    """

    choice: Optional[str]
    reason: Optional[str]
    weights: Dict[str, float] = field(default_factory=dict)
    source: str = "equal"
    targets: Dict[str, float] = field(default_factory=dict)
    fresh: Dict[str, int] = field(default_factory=dict)


def plan_class(fresh: Mapping[str, int], labels: Mapping[str, int], cursors: Mapping[str, Mapping[str, Any]], min_fresh: int,
               demand: Optional[Mapping[str, float]] = None) -> DemandPlan:
    """Which class to make next (module docstring).

    Args:
        fresh: fresh records of each class (``{name: count}``).
        labels: each class's label (``{name: label}``), in the worker's order of classes.
        cursors: the live consumers' cursors.
        min_fresh: the worker's total of fresh records to keep.
        demand: the worker's own weights, used when no cursor states ratios for its classes.
    """
    weights, source = class_weights(cursors, labels, demand)
    total = sum(weights.values())
    # rounded, so that float noise (24 · 0.1 / 0.6 = 4.000000000000001) never asks for one more batch
    targets = {n: (round(min_fresh * weights[n] / total, 9) if total > 0 else 0.0) for n in labels}

    def deficit(name: str) -> float:
        t = targets[name]
        return (t - fresh[name]) / t if t > 0 else -float(fresh[name])

    order = list(labels)
    waiting = _waiting_for(cursors, labels)
    plan = DemandPlan(None, None, weights, source, targets, dict(fresh))
    if waiting:
        plan.choice = max((n for n in order if n in waiting), key=deficit)
        plan.reason = "waiting"
        return plan
    short = [n for n in order if targets[n] > 0 and fresh[n] < targets[n]]
    if short:
        plan.choice = max(short, key=deficit)  # max keeps the first of equals: the order of the classes
        plan.reason = "deficit"
    return plan
