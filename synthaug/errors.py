"""Exceptions raised by synthaug. Each names the input that was wrong and what to do."""

from __future__ import annotations

__all__ = ["SynthaugError", "CorruptRecordError", "CacheFormatError", "SyntheticExhaustedError"]


class SynthaugError(Exception):
    """Base class of the errors synthaug raises on purpose (the CLI prints them without a traceback)."""


class CorruptRecordError(SynthaugError):
    """A cache record failed its CRC or could not be decoded.

    Attributes:
        seq: the sequence number of the record.
        path: the cache it belongs to (``None`` when decoded outside a cache).
        reason: what was wrong.
    """

    def __init__(self, seq, reason: str, path=None) -> None:
        self.seq = seq
        self.reason = reason
        self.path = path
        where = f" in {path}" if path is not None else ""
        super().__init__(
            f"synthetic record seq={seq}{where} is corrupt: {reason}. "
            "Run `synthaug cache verify` to list every damaged record."
        )

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.seq, self.reason, self.path))


class CacheFormatError(SynthaugError):
    """The folder is not a synthaug cache, or was written by a newer format version."""


class SyntheticExhaustedError(SynthaugError):
    """No synthetic record is available and the policy forbids waiting or reusing."""
