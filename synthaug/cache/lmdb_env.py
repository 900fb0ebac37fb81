"""Process-local LMDB environments: one per cache directory per process, safe across fork.

Why this module exists (LMDB rules, and what py-lmdb 3 adds to them):

* LMDB forbids using an environment in a process other than the one that opened it: reader
  slots in the shared lock file are owned per process. py-lmdb 3 also refuses to open the same
  environment twice in one process, and that refusal is inherited by a forked child, which then
  can neither reuse the parent's handle safely nor open its own.
* Closing the inherited handle in the child lets it open its own, but closing aborts every
  transaction the handle knew of, and aborting a *read* transaction inherited from the parent
  clears the parent's reader slot in shared memory: the writer may then recycle pages the
  parent is still reading. So no transaction of ours may be open at the moment of fork.

Hence: every transaction in this process passes a shared/exclusive *gate*; ``os.register_at_fork``
takes the gate exclusively before fork (waiting for open transactions to end), and the child
closes the inherited handles (now without transactions) and opens fresh ones on first use.
The same exclusive gate guards ``set_mapsize``, which LMDB allows only with no transaction open
in the process. Spare-transaction caching is off for the same reason.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator

import lmdb

from synthaug.errors import CacheDiskFullError, CacheFormatError

__all__ = ["EnvHandle", "acquire_env", "release_env", "DB_NAMES", "NotCreatedYetError"]

DB_NAMES = (b"records", b"meta", b"cursors")


class NotCreatedYetError(CacheFormatError):
    """The environment exists but its named databases do not (yet): a cache another process is
    creating right now, or an empty LMDB opened read-only."""

_FORK_WAIT_S = 10.0


class _Gate:
    """Shared (transactions) / exclusive (fork, map resize) gate for one process.

    A thread waiting for the exclusive side first shuts the gate to new transactions, then
    waits for the open ones to end: a thread that reads in a tight loop cannot starve a fork or
    a map resize. Each thread's own open transactions are counted too, so a fork from inside a
    transaction does not wait for itself.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.active = 0
        self.exclusive = False
        self.closing = False  # someone waits for the exclusive side: no new transaction starts
        self.local = threading.local()

    def mine(self) -> int:
        """Transactions open in the calling thread."""
        return getattr(self.local, "depth", 0)

    def enter(self) -> None:
        with self.cond:
            while self.exclusive or self.closing:
                self.cond.wait()
            self.active += 1
        self.local.depth = self.mine() + 1

    def leave(self) -> None:
        self.local.depth = self.mine() - 1
        with self.cond:
            self.active -= 1
            if self.active == 0 or self.closing:
                self.cond.notify_all()

    @contextmanager
    def exclusively(self) -> Iterator[None]:
        with self.cond:
            while self.exclusive or self.closing:
                self.cond.wait()
            self.closing = True
            try:
                self.cond.wait_for(lambda: self.active == 0)
            except BaseException:  # interrupted (Ctrl-C, a timeout signal): never leave the gate shut
                self.closing = False
                self.cond.notify_all()
                raise
            self.closing = False
            self.exclusive = True
        try:
            yield
        finally:
            with self.cond:
                self.exclusive = False
                self.cond.notify_all()


_GATE = _Gate()
_ENVS: Dict[str, "EnvHandle"] = {}
_ENVS_LOCK = threading.Lock()
_FORK_STATE = {"busy_at_fork": False}
# Handles inherited through a fork while a transaction was open: never closed (that would clear
# the parent's reader slots), only kept alive so their destructor does not run.
_ORPHANS = []
# Releases queued by SyntheticCache.__del__ when the module lock was taken (see release_env).
_DEFERRED: list = []


def _before_fork() -> None:
    """Shut the gate to new transactions and wait (at most ``_FORK_WAIT_S``) for the open ones of
    other threads to end; the gate's lock is held across the fork."""
    gate = _GATE
    gate.cond.acquire()
    deadline = time.monotonic() + _FORK_WAIT_S
    while (gate.exclusive or gate.closing) and time.monotonic() < deadline:  # a map resize or close
        gate.cond.wait(max(0.0, deadline - time.monotonic()))
    gate.closing = True
    mine = gate.mine()
    while gate.active > mine and time.monotonic() < deadline:
        gate.cond.wait(max(0.0, deadline - time.monotonic()))
    _FORK_STATE["busy_at_fork"] = gate.active > 0 or gate.exclusive


def _after_fork_parent() -> None:
    _GATE.closing = False
    _GATE.cond.notify_all()
    _GATE.cond.release()


def _after_fork_child() -> None:
    global _GATE, _ENVS_LOCK
    busy = _FORK_STATE["busy_at_fork"]
    _GATE = _Gate()
    _ENVS_LOCK = threading.Lock()
    for handle in list(_ENVS.values()):
        handle._stale = True
        if busy:
            _ORPHANS.append(handle.env)
        else:
            try:
                handle.env.close()
            except lmdb.Error:  # pragma: no cover - nothing we can do in the child
                _ORPHANS.append(handle.env)
    _ENVS.clear()
    _DEFERRED.clear()
    _FORK_STATE["busy_at_fork"] = False
    _FORK_STATE["busy_paths"] = busy


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


class EnvHandle:
    """An open LMDB environment of this process with its named databases."""

    def __init__(self, path: str, env: lmdb.Environment, readonly: bool) -> None:
        self.path = path
        self.env = env
        self.readonly = readonly
        foreign = _foreign_keys(env)
        if foreign:
            env.close()
            raise CacheFormatError(
                f"{path} holds an LMDB database that is not a synthaug cache (its main database has the keys "
                f"{', '.join(repr(k) for k in foreign)}); synthaug does not write into another program's LMDB. "
                "Give the cache a new or empty folder"
            )
        try:
            self.dbs = {name.decode(): env.open_db(name, create=not readonly) for name in DB_NAMES}
        except lmdb.NotFoundError:
            env.close()
            raise NotCreatedYetError(f"{path} is an LMDB environment but not a synthaug cache (named databases missing)") from None
        self.refs = 0
        self.pid = os.getpid()
        self._stale = False

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction with ``buffers=True``: values are memoryviews valid inside."""
        while True:
            _GATE.enter()
            try:
                txn = self.env.begin(buffers=True)
            except lmdb.MapResizedError:
                _GATE.leave()
                self._adopt_map_size()
                continue
            except BaseException:
                _GATE.leave()
                raise
            break
        try:
            yield txn
        finally:
            txn.abort()
            _GATE.leave()

    def write(self, fn: Callable[[lmdb.Transaction], object]) -> object:
        """Run ``fn(txn)`` in one write transaction and commit it.

        On ``MDB_MAP_FULL`` the transaction is aborted, the map doubled, and ``fn`` run again
        from the start, so ``fn`` must read everything it depends on through ``txn``.
        """
        if self.readonly:
            raise PermissionError(f"cache {self.path} is open read-only")
        while True:
            _GATE.enter()
            grow = False
            try:
                try:
                    txn = self.env.begin(write=True, buffers=True)
                except lmdb.MapResizedError:
                    grow = None
                else:
                    try:
                        result = fn(txn)
                        txn.commit()
                        return result
                    except lmdb.MapFullError:
                        txn.abort()
                        grow = True
                    except lmdb.Error as exc:
                        txn.abort()
                        if not _disk_full(self.path, exc):
                            raise
                        raise CacheDiskFullError(_disk_full_message(self.path)) from None
                    except BaseException:
                        txn.abort()
                        raise
            finally:
                _GATE.leave()
            if grow is None:
                self._adopt_map_size()
            else:
                self._grow()

    def _adopt_map_size(self) -> None:
        with _GATE.exclusively():
            self.env.set_mapsize(0)

    def _grow(self) -> None:
        with _GATE.exclusively():
            current = self.env.info()["map_size"]
            self.env.set_mapsize(current * 2)

    def map_size(self) -> int:
        return self.env.info()["map_size"]


def acquire_env(
    path: str,
    *,
    readonly: bool,
    map_size: int,
    max_readers: int,
    sync: bool,
) -> EnvHandle:
    """The process's handle for the cache directory ``path`` (opened on first use)."""
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        _drain_deferred()
        handle = _ENVS.get(key)
        if handle is not None and not readonly and handle.readonly:
            if handle.refs > 0 or _GATE.active:
                raise PermissionError(
                    f"cache {path} is already open read-only in this process; open it writable first "
                    "(or close the read-only SyntheticCache)"
                )
            del _ENVS[key]
            with _GATE.exclusively():
                handle.env.close()
            handle = None
        if handle is None:
            try:
                env = lmdb.open(
                    key,
                    map_size=map_size,
                    subdir=True,
                    readonly=readonly,
                    create=not readonly,
                    max_dbs=len(DB_NAMES) + 1,
                    max_readers=max_readers,
                    max_spare_txns=0,
                    readahead=False,
                    meminit=False,
                    sync=sync,
                    metasync=sync,
                    lock=True,
                )
            except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as exc:
                raise CacheFormatError(
                    f"{path} is not a synthaug cache: its data.mdb is not a readable LMDB file ({exc}); "
                    "give the cache a new or empty folder, or restore the file"
                ) from None
            except lmdb.Error as exc:
                text = str(exc)
                if "Read-only file system" in text or "Permission denied" in text:
                    code = errno.EROFS if "Read-only" in text else errno.EACCES
                    how = "is on a read-only file system" if code == errno.EROFS else "is not writable by this user"
                    raise PermissionError(
                        code,
                        f"cache {path} {how}; open it with SyntheticCache(path, readonly=True) to read it "
                        "(writers — synthaug generate, a generation worker — need a writable folder)",
                    ) from None
                if "already open" in text and _FORK_STATE.get("busy_paths"):
                    raise RuntimeError(
                        f"cache {path} was in use by another thread when this process was forked, "
                        "so the child cannot open it safely; avoid reading the cache from a thread "
                        "while DataLoader workers start, or use multiprocessing_context='spawn'"
                    ) from exc
                raise
            env.reader_check()
            handle = EnvHandle(key, env, readonly)
            _ENVS[key] = handle
        handle.refs += 1
        return handle


def release_env(handle: EnvHandle, *, blocking: bool = True) -> None:
    """Drop one reference; close the environment when no cache object of this process uses it.

    While any transaction of this process is open, the environment is left open (unreferenced,
    reused by the next ``acquire_env`` of its path): closing needs the gate exclusively, and when
    the open transaction belongs to this very thread — the garbage collector running
    ``SyntheticCache.__del__`` in the middle of another cache's read — waiting for it would
    never end.

    ``blocking=False`` (``SyntheticCache.__del__``): never wait for the module lock. The garbage
    collector may run a destructor in a thread that already holds it (inside ``acquire_env``);
    then the release is queued and done by the next ``acquire_env`` or ``release_env``.
    """
    if not _ENVS_LOCK.acquire(blocking):
        _DEFERRED.append(handle)
        return
    try:
        _drain_deferred()
        _release_locked(handle)
    finally:
        _ENVS_LOCK.release()


def _drain_deferred() -> None:
    """Releases queued by destructors (called with ``_ENVS_LOCK`` held)."""
    while _DEFERRED:
        try:
            handle = _DEFERRED.pop()
        except IndexError:  # pragma: no cover - emptied by a destructor run meanwhile
            return
        _release_locked(handle)


def _release_locked(handle: EnvHandle) -> None:
    if handle._stale or handle.pid != os.getpid():
        return
    handle.refs -= 1
    if handle.refs <= 0 and _ENVS.get(handle.path) is handle:
        if _GATE.active:
            return
        del _ENVS[handle.path]
        with _GATE.exclusively():
            handle.env.close()


def _foreign_keys(env: lmdb.Environment, limit: int = 3) -> list:
    """Up to ``limit`` keys of the environment's main database that are not synthaug's named
    databases (a synthaug cache has none; an empty new environment has no keys at all)."""
    found = []
    with env.begin() as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            if bytes(key) not in DB_NAMES:
                found.append(bytes(key)[:40])
                if len(found) >= limit:
                    break
    return found


def _disk_full(path: str, exc: lmdb.Error) -> bool:
    """Whether a failed commit failed for want of disk space: ENOSPC, or an I/O error (a write to
    a full tmpfs can fail with EIO) while the file system has next to nothing left."""
    text = str(exc)
    if "No space left" in text:
        return True
    if "Input/output error" not in text:
        return False
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < max(1 << 20, usage.total // 100)


def _disk_full_message(path: str) -> str:
    try:
        usage = shutil.disk_usage(path)
        space = f"{usage.free:,} bytes free of {usage.total:,} on its file system"
    except OSError:
        space = "free space unknown"
    return (
        f"cache {path}: the disk is full ({space}); this write was not stored, and every record committed "
        "before it is intact and readable. Free space on that file system, lower max_items, or move the cache"
    )
