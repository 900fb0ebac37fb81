"""Stopping a writer cleanly on SIGTERM or SIGINT: never inside a cache transaction.

The generation worker (:mod:`synthaug.generation.worker`) and ``synthaug generate`` install a
:class:`StopSignal`. A signal that arrives while the process generates or sleeps raises
:class:`StopRequested` at once; one that arrives inside :meth:`StopSignal.critical` (an append, a
heartbeat write) only sets a flag, and the stop is raised when the section ends, so the
transaction is finished, not abandoned.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["StopRequested", "StopSignal"]


class StopRequested(BaseException):
    """Raised in the main thread when a stop was requested outside a critical section.
    A ``BaseException``, so ``except Exception`` in generator code does not swallow it."""


class StopSignal:
    """SIGTERM/SIGINT -> :class:`StopRequested` at the next safe point.

    Inside :meth:`critical` the signal only sets :attr:`signum`, checked when the section ends;
    anywhere else the handler raises at once. :meth:`final` is a critical section that never
    raises at its end: for the last writes (the final heartbeat, an error report), which a second
    signal must not interrupt.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._critical = 0

    def install(self) -> None:
        """Handle SIGTERM and SIGINT in this process (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        if self._critical == 0:
            raise StopRequested()

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A section a stop must not interrupt; a stop requested meanwhile is raised at its end."""
        with self.final():
            yield
        if self.signum is not None and self._critical == 0:
            raise StopRequested()

    @contextmanager
    def final(self) -> Iterator[None]:
        """A section a stop must not interrupt, after which nothing is raised (final writes)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1

    def shield(self) -> None:
        """From now on a signal only sets :attr:`signum` (the process is on its way out)."""
        self._critical += 1
