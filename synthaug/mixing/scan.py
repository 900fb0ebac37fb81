"""Reading record labels from a cache without letting one damaged header stop the scan."""

from __future__ import annotations

from typing import Dict, List, Tuple

from synthaug.cache.codec import Label
from synthaug.cache.store import SyntheticCache

__all__ = ["read_labels"]


def read_labels(cache: SyntheticCache, start: int, stop: int) -> Tuple[Dict[int, Label], List[int]]:
    """``({seq: label}, corrupt_seqs)`` for the records in ``[start, stop)``, ascending; damaged
    records (bad header or CRC) are returned apart instead of stopping the scan."""
    return cache.scan_labels(start, stop)
