"""Progress bars that behave in a terminal and in a redirected log.

Every progress bar of synthaug comes from :func:`progress_bar`, which takes tqdm's arguments
and returns an object with the part of tqdm's interface synthaug uses (``update``, ``n``,
``total``, ``set_postfix``, ``set_postfix_str``, ``set_description``, ``refresh``, ``close``,
iteration, ``with``). What it draws depends on the process-wide mode, set by
:func:`set_progress_mode` (``synthaug --no-progress`` sets ``"off"``) or else by the environment
variable ``SYNTHAUG_PROGRESS``:

- ``"auto"`` (the default): a tqdm bar when stderr is a terminal and ``TERM`` is not ``dumb`` (or
  in a Jupyter kernel, tqdm's notebook widget); otherwise ``"lines"``.
- ``"lines"``: plain lines on stderr, one at most every ``SYNTHAUG_PROGRESS_INTERVAL`` seconds
  (default 30), e.g. ``sweep: 3/12 arm (25%), 41 s elapsed, loss=0.0312``, and a final line at
  close. Never a carriage return nor an ANSI escape, so a redirected log stays readable. A bar
  made with ``leave=False`` (an inner bar) that finished prints no final line; one that stopped
  short (an error, an interrupt) does.
- ``"off"``: nothing (tqdm with ``disable=True``).

A caller's ``disable=True`` always wins. This module is a leaf: the standard library, and tqdm
imported only when a bar is made.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

__all__ = ["progress_bar", "set_progress_mode", "progress_mode", "progress_off", "MODES", "DEFAULT_INTERVAL_S"]

MODES = ("auto", "off", "lines")
DEFAULT_INTERVAL_S = 30.0
ENV_MODE = "SYNTHAUG_PROGRESS"
ENV_INTERVAL = "SYNTHAUG_PROGRESS_INTERVAL"

_mode: Optional[str] = None  # set_progress_mode's; None: the environment's


def set_progress_mode(mode: Optional[str]) -> Optional[str]:
    """Set the process-wide mode (``"auto"``, ``"off"``, ``"lines"``; ``None``: back to
    ``SYNTHAUG_PROGRESS``). Returns the previous setting, to restore it."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    previous, _mode = _mode, mode
    return previous


def progress_mode() -> str:
    """The configured mode: :func:`set_progress_mode`'s, else ``SYNTHAUG_PROGRESS``'s, else
    ``"auto"`` (an unknown value of the variable warns and counts as ``"auto"``)."""
    if _mode is not None:
        return _mode
    env = os.environ.get(ENV_MODE, "").strip().lower()
    if not env:
        return "auto"
    if env not in MODES:
        warnings.warn(f"{ENV_MODE}={env!r} is not one of {', '.join(MODES)}; using 'auto'", stacklevel=3)
        return "auto"
    return env


@contextmanager
def progress_off() -> Iterator[None]:
    """No progress bars inside the block: the mode ``"off"``, and ``SYNTHAUG_PROGRESS=off`` for
    child processes; both restored at the end (``synthaug --no-progress``)."""
    previous = set_progress_mode("off")
    previous_env = os.environ.get(ENV_MODE)
    os.environ[ENV_MODE] = "off"
    try:
        yield
    finally:
        set_progress_mode(previous)
        if previous_env is None:
            os.environ.pop(ENV_MODE, None)
        else:
            os.environ[ENV_MODE] = previous_env


def _interval() -> float:
    text = os.environ.get(ENV_INTERVAL, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        return max(0.0, float(text))
    except ValueError:
        warnings.warn(f"{ENV_INTERVAL}={text!r} is not a number of seconds; using {DEFAULT_INTERVAL_S:g}", stacklevel=3)
        return DEFAULT_INTERVAL_S


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty()) and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def progress_bar(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[float] = None,
    desc: Optional[str] = None,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    initial: float = 0,
    **kw: Any,
):
    """A progress bar in the current mode (see the module's docstring). The arguments are
    tqdm's; other tqdm keywords (``dynamic_ncols``, ``mininterval``...) reach tqdm and are
    ignored in lines mode."""
    mode = "off" if disable else progress_mode()
    if mode == "auto":
        if _in_notebook() or _stderr_is_terminal():
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, **kw)
        mode = "lines"
    if mode == "lines":
        return LineProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, disable=True, **kw)


def _clean(text: Any) -> str:
    """One line of text: no carriage return, newline or escape character."""
    return str(text).replace("\r", " ").replace("\n", " ").replace("\x1b", "?")


def _num(v: Any) -> str:
    """A number as tqdm's postfix shows it (3 significant digits when shorter)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    short = f"{v:.3g}".replace("e+0", "e+").replace("e-0", "e-")
    return short if len(short) < len(str(v)) else str(v)


def _elapsed(s: float) -> str:
    if s < 100:
        return f"{s:.0f} s"
    if s < 6000:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class LineProgress:
    """The ``"lines"`` mode's bar: a line on stderr at most every ``interval`` seconds, checked
    at each ``update``/``refresh``, and one at close (none for a finished ``leave=False`` bar)."""

    disable = False

    def __init__(self, iterable=None, *, total=None, desc=None, unit="it", leave=True, initial=0, interval: Optional[float] = None) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc or ""
        self.unit = unit
        self.leave = leave
        self.n = initial
        self.interval = _interval() if interval is None else float(interval)
        self.postfix = ""
        self.start_t = self._last_t = time.monotonic()
        self._last_n = None
        self._closed = False

    # -- tqdm's interface
    def update(self, n: float = 1) -> None:
        self.n += n
        self._maybe_write()

    def refresh(self, *_, **__) -> None:
        self._maybe_write()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={_num(v)}" for k, v in items.items())
        if refresh:
            self._maybe_write()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        if refresh:
            self._maybe_write()

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""
        if refresh:
            self._maybe_write()

    set_description_str = set_description

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        finished = self.total is not None and self.n >= self.total
        if (self.leave or not finished) and self.n != self._last_n:
            self._write()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the lines
    def line(self) -> str:
        n = _num(self.n)
        if self.total:
            done = f"{n}/{_num(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done = f"{n} {self.unit}"
        text = f"{self.desc}: {done}" if self.desc else done
        text += f", {_elapsed(time.monotonic() - self.start_t)} elapsed"
        if self.postfix:
            text += f", {self.postfix}"
        return _clean(text)

    def _maybe_write(self) -> None:
        if not self._closed and time.monotonic() - self._last_t >= self.interval:
            self._write()

    def _write(self) -> None:
        self._last_t, self._last_n = time.monotonic(), self.n
        stream = sys.stderr
        if stream is None:
            return
        try:
            stream.write(self.line() + "\n")
            stream.flush()
        except (ValueError, OSError):  # a closed or broken stderr: progress is not worth an error
            pass
