"""Soak: the live path under load — a generation worker evicting from a small cache while two
training processes with prefetching DataLoaders (4 workers each) read it — and every item checked.

What it proves (README "Mixing", "Generating"): a sampler's batches reach the training loop
exactly as drawn. No record is evicted between the sampler's draw and a DataLoader worker's
read, none is replaced, no label is another record's, while the worker keeps the cache at
``max_items`` by evicting what the consumers have released.

How:

* **Generator**: :class:`StampGenerator`, a model-free generator (the real cost of a diffusion
  model is not what is under test; its rate only sets how often the cache turns over, and this
  one is fast, so eviction never rests). Image ``s`` (per-image seed ``s``) holds ``s`` in its
  first 8 pixels and pixels drawn from ``default_rng(s)`` after them; its label is
  ``s % classes``; its meta holds the seed and ``sha256(label | pixels)[:16]``. So any item can
  be checked byte for byte from the image alone.
* **Worker**: one :class:`~synthaug.GenerationWorker` on the cache (``--max-items`` 96,
  ``--min-fresh`` 48, batches of 8, ``--worker-delay`` s per batch).
* **Trainers**: two processes, each a real training loop (a linear classifier, SGD) over
  ``mixed_loader`` with 4 DataLoader workers and ``prefetch_factor`` 4 (8 readers in all, up to
  16 batches in flight per trainer). Trainer 0 mixes every class at r = 0.25 with
  ``on_exhausted="reuse"`` and ``max_reuse=2``; trainer 1 draws only classes ``c1`` and ``c3``, at 0.05
  each (per-class shares), with ``on_exhausted="wait"``. Each records what its sampler yielded
  and checks every item of every batch the loop receives against it: a synthetic item must be
  the record drawn (its stamp is the drawn seq), hold exactly that record's pixels (regenerated
  from the seed) and carry its label (mapped to the real dataset's class); a real item must be
  the real item drawn.
* **Report**: items checked (synthetic, real), wrong items, errors (exceptions in a trainer or
  the worker), records the worker generated and evicted, replacements and missing records
  (``MixedDataset.stats()``), records evicted unseen, waits. Wrong items, errors, replacements,
  missing and evicted-unseen must be 0; ``main`` exits with status 1 otherwise.

    python benchmarks/soak.py [--seconds 600] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

import synthaug
from synthaug.benchmarks.common import print_table, write_result
from synthaug.generation.base import GeneratedBatch, Generator, per_image_seeds
from synthaug.mixing import is_synthetic

__all__ = ["run", "main", "StampGenerator", "RealStandIn", "expected_image", "item_is_right", "stamp_of", "BAD_COUNTS"]

CLASSES = [f"c{i}" for i in range(10)]
SIZE = 28
QUICK_SECONDS = 60
DEFAULT_SECONDS = 600
BAD_COUNTS = ("wrong_items", "errors", "replaced", "missing", "evicted_unseen")
TRAINERS = (
    {"name": "trainer0", "ratio": 0.25, "on_exhausted": "reuse", "max_reuse": 2},
    {"name": "trainer1", "ratio": {"c1": 0.05, "c3": 0.05}, "on_exhausted": "wait", "max_reuse": None},
)


# ---------------------------------------------------------------------------------- data
def expected_image(seed: int) -> np.ndarray:
    """The uint8 28×28 image :class:`StampGenerator` makes for per-image seed ``seed``."""
    image = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    image[0, :8] = np.frombuffer(int(seed).to_bytes(8, "big"), np.uint8)
    return image


def stamp_of(image: np.ndarray) -> int:
    """The seed in the first 8 pixels of a 28×28 image."""
    return int.from_bytes(bytes(np.asarray(image, np.uint8).reshape(SIZE, SIZE)[0, :8]), "big")


def _hash(label: int, image: np.ndarray) -> str:
    return hashlib.sha256(bytes([label]) + np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


class StampGenerator(Generator):
    """A model-free generator whose every image says which seed made it (module docstring)."""

    label_names = CLASSES

    def __init__(self, *, delay: float = 0.0, device: Optional[str] = None, batch_size: Optional[int] = None) -> None:
        self.delay = float(delay)

    @property
    def spec(self) -> Dict[str, Any]:
        return {"factory": "synthaug.benchmarks.soak:StampGenerator", "source": "soak:stamp", "overrides": {"delay": self.delay}}

    def generate(self, n: int, seed: int) -> GeneratedBatch:
        if self.delay:
            time.sleep(self.delay)
        seeds = per_image_seeds(n, seed)
        images = np.stack([expected_image(s) for s in seeds])[..., None] if n else np.zeros((0, SIZE, SIZE, 1), np.uint8)
        labels = [s % len(CLASSES) for s in seeds]
        metas = [{"source": "soak:stamp", "seed": s, "sha": _hash(lab, im[..., 0])} for s, lab, im in zip(seeds, labels, images)]
        return GeneratedBatch(images=images, labels=labels, meta=metas)


class RealStandIn:
    """The real dataset of the soak: item ``i`` is a 28×28 image of the constant ``200 + i % 50``
    with class ``c{i % 10}`` (never a valid stamp: its first pixels spell a huge seed)."""

    classes = CLASSES
    class_to_idx = {c: i for i, c in enumerate(CLASSES)}

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        i = int(i)
        return np.full((SIZE, SIZE), 200 + i % 50, np.uint8), i % 10


def item_is_right(index, image: np.ndarray, target: int, mixed) -> bool:
    """Whether a loaded item is exactly what the sampler drew at its position: for a synthetic
    index, the record it names (the stamp), with that record's pixels and its label mapped into
    the real dataset's classes; for a real index, that real item."""
    if is_synthetic(index):
        return (
            stamp_of(image) == index.seq
            and index.label == index.seq % len(CLASSES)
            and target == mixed.map_label(index.label, seq=index.seq)
            and np.array_equal(image, expected_image(index.seq))
        )
    want_image, want_target = mixed.real_dataset[index]
    return target == want_target and np.array_equal(image, want_image)


# ---------------------------------------------------------------------------------- one trainer
class _Logged:
    """The sampler as the DataLoader sees it, remembering every batch it yields, in order."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.pending: List[list] = []

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            self.pending.append(batch)
            yield batch


def _collate(items):
    import torch

    images = torch.from_numpy(np.stack([np.asarray(im) for im, _ in items]))
    targets = torch.tensor([int(t) for _, t in items])
    return images, targets


def _train(cache_path: str, cfg: Dict[str, Any], seconds: float, out: str) -> None:
    """One training process (``--trainer``): train for ``seconds``, check every item, write JSON."""
    import torch

    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    # 4 workers per trainer on a machine of fewer cores is the point (8 readers); say it once, here
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    real = RealStandIn(4096)
    mixed = synthaug.MixedDataset(real, synthaug.SyntheticCache(cache_path))
    sampler = synthaug.RatioBatchSampler(mixed, batch_size=64, synthetic_ratio=cfg["ratio"], on_exhausted=cfg["on_exhausted"],
                                         max_reuse=cfg["max_reuse"], wait_timeout=120, consumer=cfg["name"])
    logged = _Logged(sampler)
    loader = DataLoader(mixed, batch_sampler=logged, num_workers=4, prefetch_factor=4, persistent_workers=True, collate_fn=_collate)
    model = torch.nn.Linear(SIZE * SIZE, len(CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = {"synthetic_items": 0, "real_items": 0, "wrong_items": 0, "batches": 0, "epochs": 0}
    examples: List[str] = []
    error = None
    t_end = time.monotonic() + seconds
    try:
        epoch = 0
        while time.monotonic() < t_end:
            sampler.set_epoch(epoch)
            for images, targets in loader:
                drawn = logged.pending.pop(0)
                for pos, index in enumerate(drawn):
                    image, target = images[pos].numpy(), int(targets[pos])
                    counts["synthetic_items" if is_synthetic(index) else "real_items"] += 1
                    if not item_is_right(index, image, target, mixed):
                        counts["wrong_items"] += 1
                        if len(examples) < 10:
                            examples.append(f"batch {counts['batches']} position {pos}: drew {index!r}, got stamp {stamp_of(image)} label {target}")
                loss = torch.nn.functional.cross_entropy(model(images.float().flatten(1) / 255), targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                counts["batches"] += 1
                if time.monotonic() >= t_end:
                    break
            epoch += 1
            counts["epochs"] = epoch
    except Exception as exc:  # reported, not raised: the parent collects every trainer's result
        error = f"{type(exc).__name__}: {exc}"[:2000]
    st = sampler.stats()
    result = {
        "name": cfg["name"], **counts, "errors": int(error is not None), "error": error, "examples": examples,
        "dataset": mixed.stats(), "evicted_unseen": st["evicted_unseen"], "served": st["served"], "fresh": st["fresh"],
        "reused": st["reused"], "waited_s": st["waited_s"], "synthetic_share": st["synthetic_share"],
    }
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------- the campaign
def run(*, seconds: float = DEFAULT_SECONDS, max_items: int = 96, min_fresh: int = 48, worker_delay: float = 0.02,
        workdir: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Run the soak for ``seconds``; returns the report (see the module docstring)."""
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="synthaug-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = synthaug.SyntheticCache(work / "cache.lmdb", sync=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.monotonic()
    worker = synthaug.GenerationWorker(cache, StampGenerator(delay=worker_delay).spec, min_fresh=min_fresh, max_items=max_items,
                                       batch_size=8, seed=0, num_threads=1, poll_interval=0.02)
    trainers = []
    worker_error = None
    with worker.start(wait=True, timeout=120):
        deadline = time.monotonic() + 60
        while cache.fresh_count() < min_fresh and time.monotonic() < deadline:
            time.sleep(0.05)
        for cfg in TRAINERS:
            out = work / f"{cfg['name']}.json"
            cmd = [sys.executable, "-m", "synthaug.benchmarks.soak", "--trainer", json.dumps(cfg), "--cache", str(cache.path),
                   "--seconds", str(seconds), "--result", str(out)]
            trainers.append((cfg, out, subprocess.Popen(cmd, env=env)))
        bar = None
        if progress:
            from synthaug.progress import progress_bar

            bar = progress_bar(total=int(seconds), desc="soak", unit="s", dynamic_ncols=True)
        started = time.monotonic()
        while any(p.poll() is None for _, _, p in trainers):
            time.sleep(1.0)
            if bar is not None:
                bar.n = min(int(seconds), int(time.monotonic() - started))
                st = worker.status()
                bar.set_postfix_str(f"worker {st['state']}, {st['generated']} generated, cache {len(cache)}")
                bar.refresh()
            if time.monotonic() - started > seconds + 300:
                for _, _, p in trainers:
                    p.kill()
        if bar is not None:
            bar.close()
        status = worker.status()
    try:
        worker.raise_if_failed()
    except Exception as exc:
        worker_error = str(exc)[:2000]
    results = []
    for cfg, out, proc in trainers:
        if out.exists():
            results.append(json.loads(out.read_text()))
        else:
            results.append({"name": cfg["name"], "errors": 1, "error": f"trainer exited with status {proc.returncode} without a result"})
    stats = cache.stats()
    totals = {
        "seconds": round(time.monotonic() - t0, 1),
        "synthetic_items": sum(r.get("synthetic_items", 0) for r in results),
        "real_items": sum(r.get("real_items", 0) for r in results),
        "batches": sum(r.get("batches", 0) for r in results),
        "wrong_items": sum(r.get("wrong_items", 0) for r in results),
        "errors": sum(r.get("errors", 0) for r in results) + int(worker_error is not None),
        "replaced": sum(r.get("dataset", {}).get("replaced", 0) for r in results),
        "missing": sum(r.get("dataset", {}).get("missing", 0) for r in results),
        "corrupt": sum(r.get("dataset", {}).get("corrupt", 0) for r in results),
        "evicted_unseen": sum(r.get("evicted_unseen", 0) for r in results),
        "generated": status["generated"],
        "evicted": stats["evicted"],
        "max_items": max_items,
        "final_count": stats["count"],
        "verify_corrupt": cache.verify()["corrupt"],
    }
    ok = all(totals[k] == 0 for k in BAD_COUNTS) and totals["verify_corrupt"] == 0 and totals["synthetic_items"] > 0
    cache.close()
    if ok and not workdir:
        shutil.rmtree(work, ignore_errors=True)
    return {"ok": ok, "settings": {"seconds": seconds, "max_items": max_items, "min_fresh": min_fresh, "worker_delay": worker_delay,
                                   "trainers": list(TRAINERS), "dataloader_workers": 4, "prefetch_factor": 4},
            "totals": totals, "trainers": results, "worker_error": worker_error, **({} if ok else {"workdir": str(work)})}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=None, help=f"how long the trainers train (default {DEFAULT_SECONDS}; --quick: {QUICK_SECONDS})")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS} s (what the test suite runs)")
    p.add_argument("--max-items", type=int, default=96, help="the worker's max_items: small, so eviction never rests")
    p.add_argument("--min-fresh", type=int, default=48)
    p.add_argument("--worker-delay", type=float, default=0.02, help="seconds per generated batch of 8")
    p.add_argument("--workdir", default=None, help="keep the cache and results here (default: a temp folder, removed after a clean run)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--trainer", default=None, help=argparse.SUPPRESS)  # internal: run one trainer process
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    if args.trainer:
        _train(args.cache, json.loads(args.trainer), seconds, args.result)
        return
    result = run(seconds=seconds, max_items=args.max_items, min_fresh=args.min_fresh, worker_delay=args.worker_delay,
                 workdir=args.workdir, progress=not args.no_progress)
    t = result["totals"]
    rows = [
        {"metric": "seconds (wall)", "value": t["seconds"], "must be": ""},
        {"metric": "batches", "value": t["batches"], "must be": ""},
        {"metric": "synthetic items checked", "value": t["synthetic_items"], "must be": "> 0"},
        {"metric": "real items checked", "value": t["real_items"], "must be": ""},
        {"metric": "records generated", "value": t["generated"], "must be": ""},
        {"metric": f"records evicted (max_items {t['max_items']})", "value": t["evicted"], "must be": ""},
        {"metric": "wrong items", "value": t["wrong_items"], "must be": 0},
        {"metric": "errors", "value": t["errors"], "must be": 0},
        {"metric": "replaced", "value": t["replaced"], "must be": 0},
        {"metric": "missing when read", "value": t["missing"], "must be": 0},
        {"metric": "evicted unseen", "value": t["evicted_unseen"], "must be": 0},
        {"metric": "corrupt at the end (verify)", "value": t["verify_corrupt"], "must be": 0},
    ]
    for r in result["trainers"]:
        rows.append({"metric": f"{r['name']}: served / fresh / reused / waited s",
                     "value": f"{r.get('served')} / {r.get('fresh')} / {r.get('reused')} / {r.get('waited_s', 0):.1f}", "must be": ""})
    print_table(rows, ["metric", "value", "must be"])
    path = write_result("soak_quick" if args.quick else "soak", result, args.out)
    verdict = "every check passed" if result["ok"] else f"FAILED (kept {result.get('workdir')})"
    print(f"soak: {verdict}; {t['synthetic_items']:,} synthetic and {t['real_items']:,} real items checked in {t['seconds']} s; wrote {path}")
    if not result["ok"]:
        for r in result["trainers"]:
            if r.get("error") or r.get("examples"):
                print(f"  {r['name']}: {r.get('error') or ''} {r.get('examples') or ''}")
        if result["worker_error"]:
            print(f"  worker: {result['worker_error']}")
        sys.exit(1)


if __name__ == "__main__":
    main()
