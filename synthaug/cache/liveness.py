"""Is the process that wrote a cursor or a heartbeat still running?

Cursors (consumers) and the heartbeat (the generation worker) carry the writer's ``pid``, its
``host`` and, on Linux, ``pid_start``: the process's start time in clock ticks after boot
(``/proc/<pid>/stat``, field 22). On the same host a process is alive when its pid exists *and*
has that start time, so a pid the kernel reused for another process does not count. Entries from
another host cannot be checked this way (LMDB caches are node-local, so that is rare); the
heartbeat's age decides there (:data:`HEARTBEAT_STALE_S`).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Dict, Optional

__all__ = ["HOST", "HEARTBEAT_STALE_S", "LIVE_STATES", "identity", "is_alive", "dead_writer"]

HOST = socket.gethostname()
# A worker writes its heartbeat about once a second, from a thread, even during a long generate():
# a heartbeat from another host older than this means its writer is gone.
HEARTBEAT_STALE_S = 15.0
LIVE_STATES = ("starting", "running", "paused")


def _start_time(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):  # pragma: no cover - not a Linux /proc
        return None


def identity() -> Dict[str, Any]:
    """``{"pid", "host", "pid_start"}`` of this process (``pid_start`` is ``None`` off Linux)."""
    pid = os.getpid()
    return {"pid": pid, "host": HOST, "pid_start": _start_time(pid)}


def is_alive(info: Dict[str, Any]) -> Optional[bool]:
    """Whether the process named by ``info`` (``pid``, ``host``, optional ``pid_start``) runs:
    ``True``/``False`` on this host, ``None`` (cannot tell) for another host or no pid."""
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or host != HOST:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start = info.get("pid_start")
    if isinstance(start, int):
        now = _start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a newer process
    return True


def dead_writer(heartbeat: Optional[Dict[str, Any]], now: Optional[float] = None) -> Optional[str]:
    """Why the worker behind ``heartbeat`` is gone although the heartbeat claims a live state
    (``None`` when it is alive, could be, or does not claim to be)."""
    if not heartbeat or heartbeat.get("state") not in LIVE_STATES:
        return None
    alive = is_alive(heartbeat)
    age = (time.time() if now is None else now) - float(heartbeat.get("time") or 0.0)
    if alive is False:
        return (
            f"the generation worker (pid {heartbeat.get('pid')} on {heartbeat.get('host')}) is no longer running; "
            f"its last heartbeat, {age:.1f} s ago, said {heartbeat.get('state')!r} (killed, e.g. by SIGKILL or the OOM killer?)"
        )
    if alive is None and heartbeat.get("host") not in (None, HOST) and age > HEARTBEAT_STALE_S:
        return (
            f"the generation worker (pid {heartbeat.get('pid')} on host {heartbeat.get('host')}) has not written its "
            f"heartbeat for {age:.0f} s (a live worker writes one every second)"
        )
    return None
