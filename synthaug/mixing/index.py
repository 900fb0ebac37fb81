"""How a batch sampler names a synthetic item: :class:`SyntheticIndex`.

A :class:`~synthaug.mixing.sampler.RatioBatchSampler` yields lists in which real items are plain
``int`` indices into the real dataset and synthetic items are ``SyntheticIndex(seq)``, ``seq``
being the record's sequence number in the cache. ``SyntheticIndex`` is deliberately *not* an int
(nor a tuple): handed by mistake to a dataset other than :class:`~synthaug.mixing.dataset.MixedDataset`,
it fails loudly instead of silently reading real item ``seq``.
"""

from __future__ import annotations

__all__ = ["SyntheticIndex", "is_synthetic"]


class SyntheticIndex:
    """The index of a synthetic record: its cache sequence number ``seq`` (an int >= 0).

    Hashable, comparable for equality and picklable (it travels to DataLoader workers).
    """

    __slots__ = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = int(seq)

    def __eq__(self, other: object) -> bool:
        return type(other) is SyntheticIndex and other.seq == self.seq

    def __hash__(self) -> int:
        return hash(("SyntheticIndex", self.seq))

    def __repr__(self) -> str:
        return f"SyntheticIndex({self.seq})"

    def __reduce__(self):
        return (SyntheticIndex, (self.seq,))


def is_synthetic(index: object) -> bool:
    """Whether a batch sampler's index names a synthetic record."""
    return type(index) is SyntheticIndex
