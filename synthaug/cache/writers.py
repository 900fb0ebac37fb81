"""One writer per seed block: the lock a generating process holds on a cache for its life.

A generation worker stores record ``q`` with per-image seed ``seed + q``; two workers with the
same ``seed`` on one cache would make the same images twice. So a generating writer (the
:class:`~synthaug.generation.worker.GenerationWorker` process, ``synthaug worker``, ``synthaug
generate``) takes an exclusive lock on ``(cache, seed block)`` before it generates, and holds it
until it exits. The *seed block* is ``seed // SEED_BLOCK``: writers whose seeds lie in different
blocks of 10⁹ never repeat a seed (as long as a cache gets fewer than 10⁹ records), so that is how
several writers share one cache — e.g. ``synthaug worker --seed-offset 1`` (seed + 10⁹) beside a
worker with the default seed, or ``seed = node · 10⁹`` per node as ``examples/train_ddp.py`` does.

The lock is ``fcntl.flock`` on ``<cache>/writer-<block>.lock``. The kernel releases it when the
holder exits in any way (SIGKILL and the OOM killer included), so a lock is never stale; the file
keeps the holder's pid, host, worker id and start time, which the refusal names. Like LMDB's own
locks, it needs the cache on a local file system (not NFS).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from synthaug.cache import liveness
from synthaug.errors import CacheBusyError

__all__ = ["SEED_BLOCK", "WriterLock", "seed_block"]

SEED_BLOCK = 10**9


def seed_block(seed: int) -> int:
    """The block of 10⁹ seeds that ``seed`` starts in."""
    return int(seed) // SEED_BLOCK


class WriterLock:
    """The exclusive writer lock of ``cache_dir`` for the seed block of ``seed``.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. ``info`` (worker id, kind of
    writer) is stored with the holder's identity for others to read.

    Raises:
        CacheBusyError: from :meth:`acquire`, when another live process holds it.
    """

    def __init__(self, cache_dir: Union[str, os.PathLike], seed: int, **info: Any) -> None:
        self.path = Path(cache_dir) / f"writer-{seed_block(seed)}.lock"
        self.seed = int(seed)
        self.info = info
        self._fd: Optional[int] = None

    def acquire(self) -> "WriterLock":
        import fcntl

        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self.holder() or {}
            raise CacheBusyError(self._busy_message(holder), holder) from None
        record = {**liveness.identity(), "seed": self.seed, "started_at": time.time(), **self.info}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    def holder(self) -> Optional[Dict[str, Any]]:
        """What the last holder wrote (``None`` if nothing readable); whether it still holds the
        lock is what :meth:`acquire` finds out."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def _busy_message(self, holder: Dict[str, Any]) -> str:
        cache = self.path.parent
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        if holder.get("worker_id"):
            who += f" (worker {holder['worker_id']})"
        if isinstance(holder.get("started_at"), (int, float)):
            who += ", started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started_at"]))
        block = seed_block(self.seed)
        return (
            f"cache {cache} already has a live writer for seeds {block * SEED_BLOCK}..{(block + 1) * SEED_BLOCK - 1}: "
            f"{who}, seed {holder.get('seed')}. A second one would store the same images again. Stop it first, or "
            f"give this writer seeds of another block (synthaug worker/generate --seed-offset {block + 1}, i.e. seed + "
            f"{SEED_BLOCK:,}; GenerationWorker(seed=...))"
        )

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass
