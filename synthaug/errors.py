"""Exceptions raised by synthaug. Each names the input that was wrong and what to do."""

from __future__ import annotations

__all__ = [
    "SynthaugError",
    "CorruptRecordError",
    "CacheFormatError",
    "SyntheticExhaustedError",
    "GenerationWorkerError",
    "CacheBusyError",
    "CacheDiskFullError",
]


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


class CacheBusyError(SynthaugError):
    """Another live writer holds the cache for the same block of seeds (its pid, host and start
    time are in the message and in ``holder``)."""

    def __init__(self, message: str, holder=None) -> None:
        self.holder = holder or {}
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.holder))


class CacheDiskFullError(SynthaugError):
    """A write to the cache failed because its file system is full. Nothing of that write was
    stored; every record committed before it is intact and readable."""


class SyntheticExhaustedError(SynthaugError):
    """No synthetic record is available and the policy forbids waiting or reusing."""


class GenerationWorkerError(SynthaugError):
    """The background generation worker failed (its generator or its cache raised, or it died).

    Attributes:
        exc_type: name of the exception class raised in the worker (``None`` if it died without
            reporting one, e.g. killed by the OS).
        message: that exception's message, or what is known about the death.
        worker_traceback: the worker's traceback as text (``""`` when unknown).
        pid: the worker's process id; exitcode: its exit status (negative: killed by that signal).
    """

    def __init__(self, message: str, *, exc_type=None, worker_traceback: str = "", pid=None, exitcode=None) -> None:
        self.exc_type = exc_type
        self.message = message
        self.worker_traceback = worker_traceback
        self.pid = pid
        self.exitcode = exitcode
        what = f"{exc_type}: {message}" if exc_type else message
        text = f"generation worker (pid {pid}) failed: {what}"
        if worker_traceback:
            text += "\n\nTraceback in the worker process:\n" + worker_traceback.rstrip()
        super().__init__(text)

    def __reduce__(self):
        return (
            _rebuild_worker_error,
            (self.message, self.exc_type, self.worker_traceback, self.pid, self.exitcode),
        )


def _rebuild_worker_error(message, exc_type, worker_traceback, pid, exitcode):
    return GenerationWorkerError(message, exc_type=exc_type, worker_traceback=worker_traceback, pid=pid, exitcode=exitcode)
