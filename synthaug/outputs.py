"""What every command that writes results does the same way: JSON from numpy-laden dicts, written
atomically, into an output folder that is never a stranger's.

A leaf module (standard library and numpy only), so that any layer may use it: fine-tuning, the
evaluation, the CLI and the benchmarks do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

__all__ = ["jsonable", "write_json", "output_dir"]


def jsonable(value: Any, *, finite: bool = False) -> Any:
    """A copy of ``value`` that ``json.dumps`` takes: dict keys as strings, tuples and arrays as
    lists, numpy scalars as Python numbers, anything else unknown (a ``Path``, a dtype) as its
    ``str``. With ``finite``, non-finite floats become ``None`` (the JSON then holds no
    ``NaN``/``Infinity`` tokens); without it they stay (``json.dumps`` writes ``NaN``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, finite=finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, finite=finite) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), finite=finite)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if finite and not math.isfinite(value) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_json(path: Union[str, os.PathLike], obj: Any, *, indent: int = 2, finite: bool = False) -> Path:
    """Write ``jsonable(obj)`` to ``path`` through a temporary file and ``os.replace``: a reader
    (or a run killed halfway) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj, finite=finite), indent=indent, allow_nan=not finite) + "\n")
    os.replace(tmp, path)
    return path


def output_dir(
    out: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
    empty: bool = False,
    ours: Optional[Callable[[Path], bool]] = None,
    what: str = "output folder",
    hint: str = "pass --overwrite or choose another folder",
) -> Path:
    """Make ``out`` ready to write into and return it as a ``Path`` (created if missing).

    A file is refused. A folder that holds something is refused unless ``overwrite`` is given or
    ``ours(out)`` says it holds this command's own earlier output; then, with ``empty``, it is
    emptied first (otherwise the files the command writes replace theirs and the rest stay).

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder that is neither ours nor
            overwritable; the message names it and says what to do (``hint``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{what} {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite or (ours is not None and ours(out))):
            raise FileExistsError(f"{what} {out} is not empty; {hint}")
        if empty:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
