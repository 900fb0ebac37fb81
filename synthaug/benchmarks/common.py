"""Shared parts of the benchmarks: device/version record, interleaved timing, tables, JSON."""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.environment import collect_env
from synthaug.outputs import write_json

__all__ = [
    "device_record",
    "interleaved",
    "markdown_table",
    "print_table",
    "realistic_images",
    "write_result",
    "DEFAULT_RESULTS_DIR",
]

DEFAULT_RESULTS_DIR = Path("benchmarks") / "results"


def device_record() -> Dict[str, Any]:
    """Where the figures were measured: CPU/GPU, thread count and library versions."""
    env = collect_env()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = env.get("cuda_devices", [None])[0] if env.get("cuda_available") is True else f"CPU: {cpu}, {os.cpu_count()} cores"
    return {"device": device, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "env": env}


def interleaved(fns: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, Dict[str, float]]:
    """Run each function ``repeats`` times, alternating between them (A B C A B C ...), so slow
    phases of a noisy machine hit all of them alike. Each function returns a rate (items/s).

    Returns ``{name: {"median": .., "min": .., "max": .., "runs": [..]}}``.
    """
    runs: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in order:
            runs[name].append(fns[name]())
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in runs.items()}


def rate(n_items: int, fn: Callable[[], Any]) -> float:
    """Items per second of one call of ``fn`` that handles ``n_items``."""
    t0 = time.perf_counter()
    fn()
    return n_items / max(time.perf_counter() - t0, 1e-9)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> None:
    print(markdown_table(rows, columns))


def write_result(name: str, result: Dict[str, Any], out_dir: Optional[os.PathLike] = None) -> Path:
    """Write ``result`` (plus the device record) to ``OUT_DIR/NAME.json``; returns the path."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / f"{name}.json", {"benchmark": name, **device_record(), **result})


def realistic_images(n: int, size: int, channels: int, seed: int = 0, photo: Optional[int] = None) -> np.ndarray:
    """uint8 N×size×size×C images with real-photo statistics (compressible like real data).

    Gray 28×28: Fashion-MNIST test images when installed; otherwise, and for RGB, random crops
    of scikit-learn's two bundled photographs (0: ``china.jpg``, 1: ``flower.jpg``), resized,
    alternating between them, or all from ``photo``.
    """
    rng = np.random.default_rng(seed)
    if channels == 1 and size == 28 and photo is None:
        try:
            data = FashionMNIST(train=False).data.numpy()
            return data[rng.integers(0, len(data), n)][..., None].copy()
        except FileNotFoundError:
            pass
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        src = photos[i % len(photos) if photo is None else photo]
        side = int(rng.integers(min(src.shape[:2]) // 3, min(src.shape[:2])))
        y = int(rng.integers(0, src.shape[0] - side + 1))
        x = int(rng.integers(0, src.shape[1] - side + 1))
        crop = Image.fromarray(src[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        if channels == 1:
            crop = crop.convert("L")
        arr = np.asarray(crop)
        out[i] = arr[..., None] if channels == 1 else arr
    return out
