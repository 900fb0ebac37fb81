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

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

import lmdb

from synthaug.errors import CacheFormatError

__all__ = ["EnvHandle", "acquire_env", "release_env", "DB_NAMES"]

DB_NAMES = (b"records", b"meta", b"cursors")
_FORK_WAIT_S = 10.0


class _Gate:
    """Shared (transactions) / exclusive (fork, map resize) gate for one process."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.active = 0
        self.exclusive = False

    def enter(self) -> None:
        with self.cond:
            while self.exclusive:
                self.cond.wait()
            self.active += 1

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            if self.active == 0:
                self.cond.notify_all()

    @contextmanager
    def exclusively(self) -> Iterator[None]:
        with self.cond:
            while self.exclusive:
                self.cond.wait()
            self.exclusive = True
            try:
                self.cond.wait_for(lambda: self.active == 0)
            except BaseException:  # interrupted (Ctrl-C, a timeout signal): never leave the gate shut
                self.exclusive = False
                self.cond.notify_all()
                raise
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


def _before_fork() -> None:
    _GATE.cond.acquire()
    deadline = time.monotonic() + _FORK_WAIT_S
    while _GATE.active and time.monotonic() < deadline:
        _GATE.cond.wait(max(0.0, deadline - time.monotonic()))
    _FORK_STATE["busy_at_fork"] = _GATE.active > 0


def _after_fork_parent() -> None:
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
        try:
            self.dbs = {name.decode(): env.open_db(name, create=not readonly) for name in DB_NAMES}
        except lmdb.NotFoundError:
            env.close()
            raise CacheFormatError(f"{path} is an LMDB environment but not a synthaug cache (named databases missing)") from None
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
            except lmdb.Error as exc:
                if "already open" in str(exc) and _FORK_STATE.get("busy_paths"):
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


def release_env(handle: EnvHandle) -> None:
    """Drop one reference; close the environment when no cache object of this process uses it.

    While any transaction of this process is open, the environment is left open (unreferenced,
    reused by the next ``acquire_env`` of its path): closing needs the gate exclusively, and when
    the open transaction belongs to this very thread — the garbage collector running
    ``SyntheticCache.__del__`` in the middle of another cache's read — waiting for it would
    never end.
    """
    with _ENVS_LOCK:
        if handle._stale or handle.pid != os.getpid():
            return
        handle.refs -= 1
        if handle.refs <= 0 and _ENVS.get(handle.path) is handle:
            if _GATE.active:
                return
            del _ENVS[handle.path]
            with _GATE.exclusively():
                handle.env.close()
