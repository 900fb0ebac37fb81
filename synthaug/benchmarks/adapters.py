"""Adapters: is one worker serving three classes (one base model, LoRA adapters swapped per batch)
as fast as three workers with one adapter each on the same cores, and what does one swap cost?

Setup: three adapters of ``builtin:fashion-mnist-ddpm`` (Shirt, Coat, Pullover), trained with
``finetune_lora`` for ``--finetune-steps`` steps on ``--train-images`` real Fashion-MNIST images
each (few steps: the figures are about throughput, not image quality). Generation uses the
adapters' own sampler settings (the model's: DPM-Solver++, 20 steps, guidance 2) unless
``--steps`` is given, ``--batch-size`` images per batch, on the CPU.

Throughput, each configuration filling a new cache (or three) to ``--images`` images, a third per
class, ``--repeats`` times, alternating between the configurations:

* **one worker, 3 adapters**: ``GenerationWorker(cache, {"Shirt": a, "Coat": b, "Pullover": c})``
  with ``torch`` on all the cores used (``--cores``, default: all this process may use);
* **3 workers, 1 adapter each**: one ``GenerationWorker`` per class, each with its own cache and
  ``cores // 3`` threads (at least 1), all three on the same cores.

Every process is pinned to the same cores (``os.sched_setaffinity``, inherited by the workers).
Reported: wall time from starting the worker(s) to the last image (model loading included), the
steady images/s (images appended while every worker was generating, over that time: from the last
worker's first append to the first worker's last), and the peak resident memory of the worker
processes together (``VmHWM``).

Swap cost, in this process (``torch`` on the same threads): ``--swaps`` swaps among the three
adapters of a :class:`~synthaug.generation.multi.MultiAdapterGenerator`, each timed; median and
90th percentile, for merged swapping (the default: restore the original weights, merge the next
adapter) and for ``fuse=False`` (switch peft's active adapter only). Beside it, images/s of one
class's ``generate`` with the adapter merged vs unmerged (the per-step cost of ``fuse=False``),
interleaved, and the memory the merged swap keeps (a copy of the adapted layers' original weights).

    python benchmarks/adapters.py [--quick] [--images N] [--repeats R] [--swaps S] [--cores 0,1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from synthaug.benchmarks.common import interleaved, print_table, rate, write_result

__all__ = ["run", "main", "make_adapters", "CLASSES", "THROUGHPUT_COLUMNS", "SWAP_COLUMNS"]

MODEL = "builtin:fashion-mnist-ddpm"
CLASSES = {"Shirt": 6, "Coat": 4, "Pullover": 2}  # Fashion-MNIST class indices of the built-in model
THROUGHPUT_COLUMNS = ["config", "processes", "threads each", "images", "wall s (median)", "steady images/s (median)", "min", "max",
                      "vs 3 workers", "peak RSS MiB (all workers)"]
SWAP_COLUMNS = ["swap", "median ms", "p90 ms", "swaps", "kept copy MiB", "generate images/s", "vs merged"]


def make_adapters(root: Path, *, steps: int, images: int, log=print) -> Dict[str, Path]:
    """Three adapters of the built-in model, ``steps`` optimizer steps each on ``images`` real
    Fashion-MNIST training images of their class (``finetune_lora``)."""
    from PIL import Image

    from synthaug.data.fashion_mnist import FashionMNIST
    from synthaug.finetune import finetune_lora

    ds = FashionMNIST(train=True)
    targets = ds.targets.numpy()
    out = {}
    for name, label in CLASSES.items():
        folder = root / f"{name}-images"
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(targets == label)[:images]:
            Image.fromarray(ds.data[i].numpy()).save(folder / f"{i}.png")
        t0 = time.perf_counter()
        out[name] = finetune_lora(MODEL, folder, root / name, class_name=name, steps=steps, batch_size=8, min_images=min(5, images),
                                  validation_steps=2, progress=False)
        log(f"  adapter {name}: {steps} steps on {images} images, {time.perf_counter() - t0:.1f} s")
    return out


def _vm_hwm_mib(pid: Optional[int]) -> float:
    """Peak resident memory of a process (``VmHWM``), MiB; 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, TypeError):
        pass
    return 0.0


def _fill(groups: List[Dict[str, Any]], root: Path, *, images: int, batch_size: int, threads: int, overrides: Dict[str, Any],
          timeout: float = 600.0) -> Dict[str, Any]:
    """Start one worker per group (``{"generator": ..., "images": n}``), each on its own new cache,
    and wait until each holds its images. Returns wall time, steady rate and peak memory."""
    from synthaug import GenerationWorker, SyntheticCache

    workers, caches = [], []
    t_start = time.perf_counter()
    for i, g in enumerate(groups):
        cache = SyntheticCache(root / f"cache-{i}")
        w = GenerationWorker(cache, g["generator"], min_fresh=g["images"], max_items=10 * images, batch_size=batch_size, seed=0,
                             num_threads=threads, poll_interval=0.01)
        w.start()
        workers.append(w)
        caches.append(cache)
    first: List[Optional[float]] = [None] * len(groups)
    done: List[Optional[float]] = [None] * len(groups)
    trace: List[tuple] = []  # (time, total images)
    deadline = time.monotonic() + timeout
    try:
        while not all(done):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers made {sum(len(c) for c in caches)} of {images} images in {timeout} s")
            now = time.perf_counter()
            counts = [len(c) for c in caches]
            trace.append((now, sum(counts)))
            for i, (n, g) in enumerate(zip(counts, groups)):
                if n and first[i] is None:
                    first[i] = now
                if n >= g["images"] and done[i] is None:
                    done[i] = now
            for w in workers:
                w.raise_if_failed()
            time.sleep(0.01)
        peak = sum(_vm_hwm_mib(w.pid) for w in workers)
    finally:
        for w in workers:
            w.stop()
    t0, t1 = max(first), min(done)

    def at(t: float) -> int:
        return max((n for tt, n in trace if tt <= t), default=0)

    steady = (at(t1) - at(t0)) / (t1 - t0) if t1 > t0 else float("nan")
    return {"wall_s": max(done) - t_start, "steady_images_per_s": steady, "peak_rss_mib": peak,
            "first_image_s": min(first) - t_start, "images": sum(len(c) for c in caches)}


def _swap_costs(adapters: Dict[str, Path], overrides: Dict[str, Any], *, swaps: int, batch_size: int, repeats: int) -> List[Dict[str, Any]]:
    """Swap timings (merged and unmerged) and the sampling rate of each, in this process."""
    from synthaug.generation.multi import MultiAdapterGenerator

    specs = {name: {"source": str(folder), "overrides": dict(overrides, batch_size=batch_size)} for name, folder in adapters.items()}
    rows, gens = [], {}
    for fuse in (True, False):
        multi = MultiAdapterGenerator(specs, fuse=fuse)
        keys = [f"class{i}" for i in range(len(adapters))]
        times = []
        for i in range(swaps + 1):
            t0 = time.perf_counter()
            multi.switch.activate(keys[i % len(keys)])
            if i:  # the first activation merges into untouched weights: not a swap
                times.append(time.perf_counter() - t0)
        kept = sum(w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0) for w, b in multi.switch._originals)
        label = "merged (fuse=True, default)" if fuse else "unmerged (fuse=False)"
        gens[label] = multi.for_class("Shirt")
        rows.append({"swap": label, "median ms": 1000 * statistics.median(times), "p90 ms": 1000 * float(np.percentile(times, 90)),
                     "swaps": len(times), "kept copy MiB": kept / 2**20, "swap_times_ms": [1000 * t for t in times]})
    timing = interleaved({k: (lambda g=g: rate(batch_size, lambda: g.generate(batch_size, 0))) for k, g in gens.items()}, repeats)
    base = timing[rows[0]["swap"]]["median"]
    for row in rows:
        t = timing[row["swap"]]
        row.update({"generate images/s": t["median"], "vs merged": t["median"] / base, "generate_timing": t})
    return rows


def run(quick: bool = False, *, images: int = 0, repeats: int = 0, swaps: int = 0, cores: Optional[Sequence[int]] = None,
        batch_size: int = 16, steps: Optional[int] = None, finetune_steps: int = 0, train_images: int = 0, log=print) -> Dict[str, Any]:
    """Measure; returns ``{"throughput": [...], "swap": [...], "settings": {...}}`` (module docstring)."""
    import torch

    t_begin = time.perf_counter()
    images = images or (24 if quick else 96)
    images -= images % 3
    repeats = repeats or (1 if quick else 3)
    swaps = swaps or (30 if quick else 300)
    finetune_steps = finetune_steps or (1 if quick else 20)
    train_images = train_images or (5 if quick else 20)
    if quick and steps is None:
        steps = 4
    cores = sorted(cores if cores else os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)  # the workers inherit it: every configuration on the same cores
    torch.set_num_threads(len(cores))
    overrides = {} if steps is None else {"num_inference_steps": int(steps)}
    three_threads = max(1, len(cores) // 3)
    with tempfile.TemporaryDirectory(prefix="synthaug-adapters-") as tmp:
        root = Path(tmp)
        log(f"adapters: {finetune_steps} finetune steps each on {train_images} images")
        adapters = make_adapters(root / "adapters", steps=finetune_steps, images=train_images, log=log)
        specs = {name: {"source": str(folder), "overrides": dict(overrides)} for name, folder in adapters.items()}
        configs = {
            "one worker, 3 adapters": dict(groups=[{"generator": specs, "images": images}], threads=len(cores)),
            "3 workers, 1 adapter each": dict(groups=[{"generator": spec, "images": images // 3} for spec in specs.values()], threads=three_threads),
        }
        runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in configs}
        log(f"throughput: {images} images per run ({images // 3} per class), batch {batch_size}, {repeats} repeats, cores {cores}")
        for r in range(repeats):
            order = list(configs) if r % 2 == 0 else list(reversed(list(configs)))
            for name in order:
                c = configs[name]
                res = _fill(c["groups"], root / f"run-{r}-{len(runs[name])}-{len(c['groups'])}", images=images, batch_size=batch_size,
                            threads=c["threads"], overrides=overrides)
                runs[name].append(res)
                log(f"  {name}: {res['wall_s']:.1f} s wall, {res['steady_images_per_s']:.2f} images/s steady, {res['peak_rss_mib']:.0f} MiB")
        base = statistics.median(r["steady_images_per_s"] for r in runs["3 workers, 1 adapter each"])
        throughput = []
        for name, c in configs.items():
            rates = [r["steady_images_per_s"] for r in runs[name]]
            throughput.append({
                "config": name, "processes": len(c["groups"]), "threads each": c["threads"], "images": images,
                "wall s (median)": statistics.median(r["wall_s"] for r in runs[name]),
                "steady images/s (median)": statistics.median(rates), "min": min(rates), "max": max(rates),
                "vs 3 workers": statistics.median(rates) / base,
                "peak RSS MiB (all workers)": statistics.median(r["peak_rss_mib"] for r in runs[name]),
                "first image s (median)": statistics.median(r["first_image_s"] for r in runs[name]), "runs": runs[name],
            })
        log(f"swap cost: {swaps} swaps each way")
        swap_rows = _swap_costs(adapters, overrides, swaps=swaps, batch_size=batch_size, repeats=max(3, repeats))
    return {
        "quick": quick, "model": MODEL, "classes": CLASSES, "throughput": throughput, "swap": swap_rows,
        "settings": {"images": images, "repeats": repeats, "swaps": swaps, "cores": cores, "batch_size": batch_size,
                     "sampler": overrides or "the adapters' own (dpm++, 20 steps, guidance 2)", "finetune_steps": finetune_steps,
                     "train_images": train_images, "three_worker_threads": three_threads},
        "total_s": time.perf_counter() - t_begin,
    }


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="adapters of 1 step on 5 images, 24 images, 4 sampling steps, 1 repeat, 30 swaps "
                   "(a smoke test, not figures)")
    p.add_argument("--images", type=int, default=0, help="images per run, a third per class (0: 96, quick 24)")
    p.add_argument("--repeats", type=int, default=0, help="runs of each configuration, alternating (0: 3, quick 1)")
    p.add_argument("--swaps", type=int, default=0, help="timed swaps each way (0: 300, quick 30)")
    p.add_argument("--cores", default=None, help="comma-separated CPU cores to pin everything to (default: all this process may use)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (and per append)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the adapters' own, 20; quick 4)")
    p.add_argument("--finetune-steps", type=int, default=0, help="optimizer steps per adapter (0: 20, quick 1)")
    p.add_argument("--train-images", type=int, default=0, help="real images per adapter (0: 20, quick 5)")
    p.add_argument("--out", default=None, help="folder for adapters.json (default benchmarks/results)")
    args = p.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    result = run(args.quick, images=args.images, repeats=args.repeats, swaps=args.swaps, cores=cores, batch_size=args.batch_size,
                 steps=args.steps, finetune_steps=args.finetune_steps, train_images=args.train_images)
    s = result["settings"]
    print(f"\n{MODEL} with 3 adapters on CPU cores {s['cores']}, batch {s['batch_size']}, sampler {s['sampler']}; "
          f"{s['images']} images per run, median of {s['repeats']}:")
    print_table(result["throughput"], THROUGHPUT_COLUMNS)
    print(f"\nadapter swap, median of {s['swaps']} (torch on {len(s['cores'])} threads); generate: {s['batch_size']} images of one class:")
    print_table(result["swap"], SWAP_COLUMNS)
    print(f"total {result['total_s']:.0f} s")
    path = write_result("adapters" + ("_quick" if args.quick else ""), result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
