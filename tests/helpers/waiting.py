"""Polling with a deadline, for tests that watch another process (a worker, a writer)."""

import time


def wait_for(cond, timeout: float = 60.0, interval: float = 0.02, what: str = "condition") -> None:
    """Return once ``cond()`` is true; fail the test after ``timeout`` seconds, naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
