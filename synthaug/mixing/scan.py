"""Reading record labels from a cache without letting one damaged header stop the scan."""

from __future__ import annotations

from typing import Dict, List, Tuple

from synthaug.cache.codec import Label
from synthaug.cache.store import SyntheticCache

__all__ = ["read_labels", "first_seq"]


def read_labels(cache: SyntheticCache, start: int, stop: int) -> Tuple[Dict[int, Label], List[int]]:
    """``({seq: label}, corrupt_seqs)`` for the records in ``[start, stop)``, ascending; damaged
    records (bad header or CRC) are returned apart instead of stopping the scan."""
    return cache.scan_labels(start, stop)


def first_seq(cache: SyntheticCache) -> int:
    """The oldest stored sequence number; ``next_seq`` when the cache is empty (every record
    ever written is then gone)."""
    first = cache.first_seq()
    return first if first is not None else int(cache.stats()["next_seq"])
