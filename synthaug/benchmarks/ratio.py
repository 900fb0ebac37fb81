"""Ratio accuracy: the synthetic share of every batch under our RatioBatchSampler, against the
two ways published pipelines mix synthetic images in.

* ``ratio_batch_sampler`` (ours): batch i holds ``floor(q(i+1)) - floor(q i)`` synthetic items,
  ``q = r·B`` (docs/DESIGN.md, rule 2), on every rank of a DDP job.
* ``coin_flip``: each sample is replaced by a synthetic one with probability r (how DA-Fusion,
  Diff-Mix and SaSPA mix): the count per batch is Binomial(B, r).
* ``weighted_random_sampler``: ``torch.utils.data.WeightedRandomSampler`` over the real and
  synthetic items together, weights set so that the expected synthetic share is r, batched by
  ``BatchSampler``; under DDP each rank runs its own (seeded per rank).

All three run on the same setting (the demo's 9,030 real images, a pool of synthetic records in a
real LMDB cache, batch 64) for ``--epochs`` epochs on each of ``--world`` ranks. Reported per
method, ratio and rank: mean and standard deviation of the per-batch synthetic share, its min and
max, the fraction of batches within one item of r times the batch's size, and the total's deviation
(in items) from r of all items. Shares are of each batch's own size: with ``drop_last=False`` an
epoch's last batch of our sampler is short (it holds the real items left, plus its synthetic ones). ``ratio_histogram.png`` shows the distribution of synthetic items per batch.

    python benchmarks/ratio.py [--quick] [--ratios 0.1,0.25,0.5] [--world 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from synthaug.benchmarks.common import print_table, write_result
from synthaug.cache.store import SyntheticCache
from synthaug.mixing import MixedDataset, RatioBatchSampler, is_synthetic

__all__ = ["run", "main", "METHODS"]

METHODS = ("ratio_batch_sampler", "coin_flip", "weighted_random_sampler")


class _Real:
    """A stand-in real dataset: only the sampler's view matters here (indices, length, labels)."""

    def __init__(self, n: int) -> None:
        self.targets = np.zeros(n, dtype=np.int64)
        self._image = np.zeros((28, 28), np.uint8)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self._image, 0


def _ours(mixed, r: float, batch_size: int, epochs: int, rank: int, world: int) -> List[int]:
    sampler = RatioBatchSampler(mixed, batch_size=batch_size, synthetic_ratio=r, seed=0, num_replicas=world, rank=rank,
                                consumer=f"ratio-bench-{r}-{rank}-of-{world}")
    counts, sizes = [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts.append(sum(1 for i in batch if is_synthetic(i)))
            sizes.append(len(batch))
    return counts, sizes


def _coin_flip(n_batches: int, r: float, batch_size: int, seed: int) -> List[int]:
    rng = np.random.default_rng(seed)
    return [int(np.sum(rng.random(batch_size) < r)) for _ in range(n_batches)]


def _weighted(n_real: int, n_syn: int, r: float, batch_size: int, n_batches: int, seed: int) -> List[int]:
    import torch
    from torch.utils.data import BatchSampler, WeightedRandomSampler

    weights = torch.cat([torch.full((n_real,), (1 - r) / n_real, dtype=torch.double), torch.full((n_syn,), r / n_syn, dtype=torch.double)])
    sampler = WeightedRandomSampler(weights, num_samples=n_batches * batch_size, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [sum(1 for i in batch if i >= n_real) for batch in BatchSampler(sampler, batch_size, drop_last=True)]


def _row(method: str, r: float, rank: int, counts: Sequence[int], sizes: Sequence[int]) -> Dict[str, Any]:
    """Per-batch synthetic share against each batch's own size (an epoch's last batch may be short)."""
    c = np.asarray(counts, dtype=float)
    n = np.asarray(sizes, dtype=float)
    share = c / n
    target = r * n
    return {
        "method": method,
        "ratio": r,
        "rank": rank,
        "batches": len(c),
        "mean_share": float(share.mean()),
        "std_share": float(share.std()),
        "min_share": float(share.min()),
        "max_share": float(share.max()),
        "within_one_item": float(np.mean(np.abs(c - target) < 1)),
        "total_error_items": float(c.sum() - target.sum()),
    }


def run(quick: bool = False, *, ratios: Sequence[float] = (0.1, 0.25, 0.5), batch_size: int = 64, n_real: int = 9030,
        pool: int = 2000, epochs: Optional[int] = None, world: int = 2, out: Optional[str] = None) -> Dict[str, Any]:
    epochs = epochs or (1 if quick else 3)
    if quick:
        n_real, pool = min(n_real, 2000), min(pool, 200)
    tmp = Path(tempfile.mkdtemp(prefix="synthaug-ratio-"))
    rows: List[Dict[str, Any]] = []
    counts: Dict[str, Dict[str, List[float]]] = {}  # per-batch synthetic shares, for the histogram
    try:
        cache = SyntheticCache(tmp / "pool.lmdb")
        cache.append(np.zeros((pool, 28, 28, 1), np.uint8), 0, {"source": "ratio-benchmark"})
        mixed = MixedDataset(_Real(n_real), cache)
        for r in ratios:
            for rank in range(world):
                ours, sizes = _ours(mixed, r, batch_size, epochs, rank, world)
                n_batches = len(ours)
                full = [batch_size] * n_batches
                per_method = {
                    "ratio_batch_sampler": (ours, sizes),
                    "coin_flip": (_coin_flip(n_batches, r, batch_size, seed=1000 * rank + 1), full),
                    "weighted_random_sampler": (_weighted(n_real, pool, r, batch_size, n_batches, seed=1000 * rank + 2), full),
                }
                for method, (c, n) in per_method.items():
                    rows.append(_row(method, r, rank, c, n))
                    counts.setdefault(f"{r:g}", {}).setdefault(f"{method}/rank{rank}", []).extend(float(x) / m for x, m in zip(c, n))
        cache.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_dir = Path(out) if out is not None else Path("benchmarks") / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    png = _histogram(counts, ratios, batch_size, world, out_dir / f"ratio_histogram{suffix}.png")
    print(f"ratio accuracy: batch {batch_size}, {n_real} real images, {epochs} epoch(s), {world} rank(s)")
    print_table(rows, ["method", "ratio", "rank", "batches", "mean_share", "std_share", "min_share", "max_share", "within_one_item", "total_error_items"])
    settings = {"ratios": list(ratios), "batch_size": batch_size, "n_real": n_real, "pool": pool, "epochs": epochs, "world": world, "quick": quick}
    path = write_result("ratio" + suffix, {"settings": settings, "rows": rows, "histogram": str(png)}, out_dir)
    print(f"wrote {path} and {png}")
    return {"rows": rows, "settings": settings, "histogram": png}


def _histogram(counts, ratios, batch_size: int, world: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ratio_batch_sampler": "tab:blue", "coin_flip": "tab:red", "weighted_random_sampler": "tab:green"}
    fig, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 3.8), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], ratios):
        per = counts[f"{r:g}"]
        lo = min(min(v) for v in per.values()) * batch_size
        hi = max(max(v) for v in per.values()) * batch_size
        bins = np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.5) / batch_size  # one bin per item of a full batch
        for method in METHODS:
            for rank in range(world):
                c = per[f"{method}/rank{rank}"]
                ax.hist(c, bins=bins, histtype="step" if method != "ratio_batch_sampler" else "stepfilled", lw=1.5,
                        alpha=0.35 if method == "ratio_batch_sampler" else 0.9, color=colors[method], ls="-" if rank == 0 else "--",
                        label=f"{method} (rank {rank})", weights=np.full(len(c), 1 / len(c)))
        ax.axvline(r, color="k", lw=1, ls=":")
        ax.set_title(f"r = {r:g} (batch {batch_size}: {r * batch_size:g} synthetic items)", fontsize=10)
        ax.set_xlabel("synthetic share of a batch")
        ax.set_ylabel("fraction of batches")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 real images, one epoch (seconds)")
    p.add_argument("--ratios", default="0.1,0.25,0.5", help="comma-separated ratios (default 0.1,0.25,0.5)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--world", type=int, default=2, help="DDP ranks simulated, each with its own sampler (default 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 3, quick 1)")
    p.add_argument("--out", default=None, help="folder for ratio.json and ratio_histogram.png (_quick.json/_quick.png with --quick; default benchmarks/results)")
    args = p.parse_args(argv)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    if not ratios or not all(0 < r < 1 for r in ratios):
        p.error(f"--ratios must be numbers in (0, 1), got {args.ratios!r}")
    if args.world < 1 or args.batch_size < 1:
        p.error("--world and --batch-size must be >= 1")
    return run(args.quick, ratios=ratios, batch_size=args.batch_size, epochs=args.epochs, world=args.world, out=args.out)


if __name__ == "__main__":  # pragma: no cover
    main()
