"""How a batch sampler names a synthetic item: :class:`SyntheticIndex`.

A :class:`~synthaug.mixing.sampler.RatioBatchSampler` yields lists in which real items are plain
``int`` indices into the real dataset and synthetic items are ``SyntheticIndex(seq, ...)``, ``seq``
being the record's sequence number in the cache. ``SyntheticIndex`` is deliberately *not* an int
(nor a tuple): handed by mistake to a dataset other than :class:`~synthaug.mixing.dataset.MixedDataset`,
it fails loudly instead of silently reading real item ``seq``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

__all__ = ["SyntheticIndex", "is_synthetic"]


class SyntheticIndex:
    """The index of a synthetic record: its cache sequence number ``seq`` (an int >= 0).

    What the sampler knew when it drew the record travels with it to the DataLoader worker that
    reads it:

    * ``label``: the record's stored label (an int, or a tuple for multi-label records). If the
      record turns out corrupt or gone when read, :class:`~synthaug.mixing.dataset.MixedDataset`
      replaces it only by a record with this same label; ``None``: the label is read from the
      record itself, and an unreadable record is not replaced.
    * ``stride``: the sampler's cache shard count (it takes records with ``seq % stride ==
      seq_of_this % stride``); a replacement comes from the same shard.
    * ``ticket``: the batch it belongs to; the dataset marks the ticket read, so the sampler
      knows which records the DataLoader still has to read (and keeps them from eviction).
      ``-1``: not tracked.

    Hashable and compared by ``seq`` only; picklable (it travels to DataLoader workers).
    """

    __slots__ = ("seq", "label", "stride", "ticket")

    def __init__(self, seq: int, label: Optional[Union[int, Tuple[int, ...]]] = None, *, stride: int = 1, ticket: int = -1) -> None:
        self.seq = int(seq)
        self.label = label
        self.stride = int(stride)
        self.ticket = int(ticket)

    def __eq__(self, other: object) -> bool:
        return type(other) is SyntheticIndex and other.seq == self.seq

    def __hash__(self) -> int:
        return hash(("SyntheticIndex", self.seq))

    def __repr__(self) -> str:
        return f"SyntheticIndex({self.seq})"

    def __reduce__(self):
        return (_rebuild, (self.seq, self.label, self.stride, self.ticket))


def _rebuild(seq: int, label, stride: int, ticket: int) -> SyntheticIndex:
    return SyntheticIndex(seq, label, stride=stride, ticket=ticket)


def is_synthetic(index: object) -> bool:
    """Whether a batch sampler's index names a synthetic record."""
    return type(index) is SyntheticIndex
