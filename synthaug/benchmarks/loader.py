"""Loader throughput: what mixing synthetic items in costs a DataLoader, against a plain one.

Question: how many samples/s does a DataLoader deliver over (a) the real data alone, (b) the
mixed data (``MixedDataset`` + ``RatioBatchSampler``) at synthetic ratios 0.1/0.25/0.5, and (c)
the synthetic read path alone (ratio 1), with the same transform, batch size and workers?

Every contender yields epochs of exactly ``batches`` batches of ``B`` items (the plain loader over
the first ``batches × B`` real items, the mixed ones with ``batches_per_epoch``), uses persistent
workers, is warmed up by one epoch, and is then timed one epoch per run, the contenders
alternating run by run (``interleaved``). ``vs plain`` is the median of the per-run (paired)
ratios, with their min–max.
The real data lives in memory (the strictest baseline: most real datasets decode files): the
Fashion-MNIST training split for 28×28 gray, crops of photographs for 256×256 RGB. The synthetic
records are raw-encoded (the cache default) with the same image statistics. Transform:
``ToTensor`` + ``Normalize``.

    python benchmarks/loader.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from synthaug.benchmarks.common import interleaved, print_table, rate, realistic_images, write_result
from synthaug.cache.store import SyntheticCache
from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.data.transforms import WithTransform
from synthaug.mixing import MixedDataset, RatioBatchSampler

__all__ = ["run", "main"]

# name, size, channels
CONFIGS = [("28x28 gray", 28, 1), ("256x256 RGB", 256, 3)]
RATIOS = (0.1, 0.25, 0.5)
HEADLINE_RATIO, HEADLINE_WORKERS = 0.25, 2
BATCH = {28: 64, 256: 32}
# per config size: (batches per epoch, real items, synthetic records) in full and quick mode
FULL = {28: (150, 20000, 4096), 256: (60, 2048, 512)}
QUICK = {28: (20, 4096, 512), 256: (10, 512, 128)}


class _InMemory:
    """A real dataset held in memory: (PIL image, int label), torchvision-like."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        im = self.images[i]
        return Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im), int(self.labels[i])


def _real_dataset(size: int, channels: int, n: int):
    if size == 28 and channels == 1:
        try:
            from torch.utils.data import Subset

            return Subset(FashionMNIST(train=True), range(n))
        except FileNotFoundError:
            pass
    images = realistic_images(n, size, channels, seed=2)
    return _InMemory(images, np.arange(n) % 10)


def _transform(channels: int):
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.25,) * channels)])


def run(
    quick: bool = False,
    repeats: int = 0,
    *,
    batches: int = 0,
    configs: Optional[Sequence[Tuple[str, int, int]]] = None,
    ratios: Sequence[float] = RATIOS,
    workers: Optional[Sequence[int]] = None,
    n_real: int = 0,
) -> Dict[str, Any]:
    """Measure every contender; returns ``{"rows": [...], "mixed_over_plain": float, ...}``.

    ``batches``/``n_real`` override the per-size defaults (the smoke test runs tiny settings).
    """
    import torch

    repeats = repeats or (3 if quick else 9)
    configs = list(configs or CONFIGS)
    workers = tuple(workers) if workers is not None else ((HEADLINE_WORKERS,) if quick else (0, HEADLINE_WORKERS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main process only collates; keep it off the workers' cores
    try:
        return _run(quick, repeats, batches, configs, ratios, workers, n_real)
    finally:
        torch.set_num_threads(threads)


def _run(quick, repeats, batches, configs, ratios, workers, n_real) -> Dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, Subset

    rows: List[Dict[str, Any]] = []
    breakdown: List[Dict[str, Any]] = []
    headline: Dict[str, float] = {}
    for name, size, channels in configs:
        m, n_r, n_s = (QUICK if quick else FULL)[size]
        m = batches or m
        b = BATCH[size]
        n_r = max(n_real or n_r, m * b)
        real = _real_dataset(size, channels, n_r)
        tf = _transform(channels)
        with tempfile.TemporaryDirectory() as tmp:
            cache = SyntheticCache(Path(tmp) / "bench", map_size=1 << 28, sync=False)
            syn = realistic_images(n_s, size, channels, seed=1)
            for s in range(0, n_s, 64):
                cache.append(syn[s : s + 64], [int(v) for v in np.arange(s, min(n_s, s + 64)) % 10], {"bench": True})
            for w in workers:
                loaders: Dict[str, Any] = {}
                plain_ds = Subset(real, range(m * b))
                common = dict(num_workers=w, persistent_workers=w > 0)
                mixed = MixedDataset(real, cache, transform=tf)
                plain_tf = WithTransform(plain_ds, tf)  # the real items with the mixed loader's transform
                loaders["plain"] = DataLoader(plain_tf, batch_size=b, shuffle=True, **common, generator=torch.Generator().manual_seed(0))
                for r in ratios:
                    sampler = RatioBatchSampler(mixed, batch_size=b, synthetic_ratio=r, batches_per_epoch=m, consumer=f"bench-{r}")
                    loaders[f"mixed r={r:g}"] = DataLoader(mixed, batch_sampler=sampler, **common)
                only = RatioBatchSampler(mixed, batch_size=b, synthetic_ratio=1, batches_per_epoch=m, consumer="bench-only")
                loaders["synthetic only"] = DataLoader(mixed, batch_sampler=only, **common)

                def epoch_fn(loader):
                    epochs = iter(range(1, 1 << 30))

                    def go() -> None:
                        if isinstance(loader.batch_sampler, RatioBatchSampler):
                            loader.batch_sampler.set_epoch(next(epochs))
                        for _ in loader:
                            pass

                    return lambda: rate(m * b, go)

                if w == 0:  # where the time goes, in this process (no workers): one breakdown per image size
                    breakdown.append({"images": name, **_breakdown(mixed, plain_tf, cache, b, m, HEADLINE_RATIO)})
                fns = {k: epoch_fn(v) for k, v in loaders.items()}
                for f in fns.values():  # warm-up: start the workers, fill page caches
                    f()
                timing = interleaved(fns, repeats)
                plain_runs = timing["plain"]["runs"]
                for k, t in timing.items():
                    paired = [x / p for x, p in zip(t["runs"], plain_runs)]
                    ratio = statistics.median(paired)
                    rows.append({
                        "images": name,
                        "workers": w,
                        "batch": b,
                        "loader": k,
                        "samples/s": t["median"],
                        "min": t["min"],
                        "max": t["max"],
                        "vs plain": ratio,
                        "vs plain min–max": f"{min(paired):.3f}–{max(paired):.3f}",
                        "timing": t,
                    })
                    if k == f"mixed r={HEADLINE_RATIO:g}" and w == HEADLINE_WORKERS:
                        headline[name] = ratio
                    elif k == f"mixed r={HEADLINE_RATIO:g}" and HEADLINE_WORKERS not in workers:
                        headline.setdefault(name, ratio)
                del loaders, fns
                print(f"  {name:<12} workers={w} done", flush=True)
            cache.close()
    return {
        "quick": quick,
        "repeats": repeats,
        "mixed_over_plain": min(headline.values()) if headline else None,
        "mixed_over_plain_by_images": headline,
        "headline": f"samples/s of the mixed loader at r={HEADLINE_RATIO} over the plain loader, {HEADLINE_WORKERS} workers "
        "(median of per-run ratios; the smaller of the image configs)",
        "rows": rows,
        "breakdown": breakdown,
    }


def _breakdown(mixed, plain, cache, batch: int, batches: int, ratio: float) -> Dict[str, Any]:
    """µs per batch of each part of a mixed batch at ``ratio`` and of a plain one, timed one part
    at a time in this process over ``batches`` batches: the sampler's draw, the real items
    (read + transform), the synthetic items (``read_batch`` alone, and the whole synthetic part:
    read, mark read, convert), and the collate."""
    import time

    from torch.utils.data import default_collate

    from synthaug.mixing import RatioBatchSampler
    from synthaug.mixing.index import SyntheticIndex

    sampler = RatioBatchSampler(mixed, batch_size=batch, synthetic_ratio=ratio, batches_per_epoch=batches, consumer="bench-breakdown")
    sampler.set_epoch(10_000)
    t = {"sampler": 0.0, "real items": 0.0, "synthetic: read_batch": 0.0, "synthetic items": 0.0, "collate": 0.0,
         "plain: items": 0.0, "plain: collate": 0.0}
    it = iter(sampler)
    n_syn = 0
    for k in range(batches):
        t0 = time.perf_counter()
        idx = next(it)
        t1 = time.perf_counter()
        syn = [i for i in idx if type(i) is SyntheticIndex]
        real = [i for i in idx if type(i) is not SyntheticIndex]
        items = mixed.__getitems__(real)
        t2 = time.perf_counter()
        cache.read_batch([i.seq for i in syn], with_meta=False)
        t3 = time.perf_counter()
        items += mixed.__getitems__(syn)
        t4 = time.perf_counter()
        default_collate(items)
        t5 = time.perf_counter()
        plain_items = [plain[(k * batch + j) % len(plain)] for j in range(batch)]
        t6 = time.perf_counter()
        default_collate(plain_items)
        t7 = time.perf_counter()
        n_syn += len(syn)
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
            t[key] += dt
    sampler.close()
    out = {f"{key} µs/batch": 1e6 * v / batches for key, v in t.items()}
    mixed_total = t["sampler"] + t["real items"] + t["synthetic items"] + t["collate"]
    plain_total = t["plain: items"] + t["plain: collate"]
    out["µs per real item"] = 1e6 * t["real items"] / (batches * batch - n_syn)
    out["µs per synthetic item"] = 1e6 * t["synthetic items"] / max(n_syn, 1)
    out["predicted mixed / plain"] = plain_total / mixed_total
    return out


COLUMNS = ["images", "workers", "batch", "loader", "samples/s", "min", "max", "vs plain", "vs plain min–max"]
BREAKDOWN_COLUMNS = ["images", "sampler µs/batch", "real items µs/batch", "synthetic: read_batch µs/batch", "synthetic items µs/batch",
                     "collate µs/batch", "plain: items µs/batch", "plain: collate µs/batch", "µs per real item", "µs per synthetic item",
                     "predicted mixed / plain"]


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer batches and repeats, 2 workers only (under a minute)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default 9, quick 3)")
    p.add_argument("--out", default=None, help="folder for loader.json (default benchmarks/results)")
    args = p.parse_args(argv)
    result = run(args.quick, args.repeats)
    print_table(result["rows"], COLUMNS)
    if result["breakdown"]:
        print(f"where the time goes (r={HEADLINE_RATIO}, no workers, µs per batch):")
        print_table(result["breakdown"], BREAKDOWN_COLUMNS)
    print(f"mixed_over_plain (r={HEADLINE_RATIO}, {HEADLINE_WORKERS} workers): {result['mixed_over_plain']:.3f} "
          f"{ {k: round(v, 3) for k, v in result['mixed_over_plain_by_images'].items()} }")
    path = write_result("loader" + ("_quick" if args.quick else ""), result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
