"""Reading record labels from a cache without letting one damaged header stop the scan."""

from __future__ import annotations

from typing import Dict, List, Tuple

from synthaug.cache.codec import Label
from synthaug.cache.store import SyntheticCache
from synthaug.errors import CorruptRecordError

__all__ = ["read_labels", "first_seq"]


def read_labels(cache: SyntheticCache, start: int, stop: int) -> Tuple[Dict[int, Label], List[int]]:
    """``({seq: label}, corrupt_seqs)`` for the records in ``[start, stop)``, ascending.

    ``SyntheticCache.labels`` raises at the first damaged header and drops the rest of the
    range; here the range is then read again one record at a time and the damaged ones are
    returned apart.
    """
    try:
        return cache.labels(start, stop), []
    except CorruptRecordError:
        pass
    labels: Dict[int, Label] = {}
    corrupt: List[int] = []
    for seq in cache.seqs(start, stop):
        try:
            labels.update(cache.labels(seq, seq + 1))
        except CorruptRecordError:
            corrupt.append(seq)
    return labels, corrupt


def first_seq(cache: SyntheticCache) -> int:
    """The oldest stored sequence number; ``next_seq`` when the cache is empty (every record
    ever written is then gone)."""
    seqs = cache.seqs(0, limit=1)
    return seqs[0] if seqs else int(cache.stats()["next_seq"])
