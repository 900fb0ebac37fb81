"""Overlap of generation and training: the same classifier training run three ways in one
invocation — real-only, pre-generate-then-train, and on-the-fly (GenerationWorker + sampler).

Setting (``fmnist``): the demo's imbalanced Fashion-MNIST split (30 real shirts, 1,000 images of
every other class), the small CNN, batch 64, ratio 0.25, ``--steps`` optimizer steps; the
generator is the embedded pixel DDPM (``builtin:fashion-mnist-ddpm`` conditioned on its untrained
Shirt slot — the images are not shirts without a LoRA, the cost is the same — or ``--adapter``) with its
demo settings (DPM-Solver++, 20 steps, guidance 2, batch 16). The trainer and the worker each get
``--threads`` torch threads (default 1: on a 2-core machine each has a core of its own).

Runs, in order:

1. ``generate``: the worker alone fills an empty cache with ``--prefill`` images: the
   generator's own rate (images/s after its first append, so model loading is excluded; with
   ``--quick`` the prefill is one append, and the rate includes loading) and the pre-generation
   time (including loading).
2. ``real_only``: training on the real data alone.
3. ``pregenerate``: training mixed at the ratio from that pre-filled cache (reusing its images);
   its wall time is the pre-generation time plus the training time.
4. ``on_the_fly``: a new, empty cache; the worker starts and training starts at once, mixing
   with ``on_exhausted="reuse"`` (fresh images first, reuse when none is fresh; it waits only
   for the very first image). Wall time from the worker's start to the end of training.
5. ``on_the_fly_capped`` and ``on_the_fly_capped_tight`` (not in ``--quick``): the same with
   ``max_reuse = k``, where ``k`` is the freshness rule's no-wait value for the measured rates
   (``k = ceil(c / g) - 1`` for consumption ``c`` and generation ``g``, see the README), and with
   a third of it, a cap that binds: the rule predicts training then runs at ``(1 + k)·g / r``
   samples/s (``predicted_samples_per_s``), which the run measures.

Reported per run: wall time, training samples/s, generator images/s, synthetic draws, fresh share
of them, mean serves per distinct synthetic image, seconds the sampler waited; and the goal's
ratio: on-the-fly wall / max(training alone, generating the same images alone).

    python benchmarks/overlap.py [--quick] [--steps N] [--ratio R] [--threads T] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from synthaug.benchmarks.common import print_table, write_result

__all__ = ["run", "main"]

GENERATION = {"num_inference_steps": 20, "scheduler": "dpm++", "guidance_scale": 2.0}


def _data(per_class: int, shots: int):
    import torch

    from synthaug.data.fashion_mnist import FashionMNIST
    from synthaug.data.splits import few_shot_split

    train = FashionMNIST(train=True)
    split = few_shot_split(train, "Shirt", shots=shots, per_class=per_class, seed=0)
    return torch.utils.data.Subset(train, split.train.tolist()), split.rare_class, list(train.classes)


def _train(name: str, loader, *, steps: int, rare: int, sampler=None) -> Dict[str, Any]:
    import torch

    from synthaug.evaluation.classifier import build_classifier, train_classifier

    torch.manual_seed(0)
    net = build_classifier("small-cnn", in_channels=1, num_classes=10)
    t0 = time.perf_counter()
    training = train_classifier(net, loader, steps=steps, progress=False, desc=name)
    wall = time.perf_counter() - t0
    out = {"train_s": wall, "samples": training["samples"], "train_samples_per_s": training["samples"] / wall}
    if sampler is not None:
        f = sampler.freshness()
        out.update(synthetic_draws=f["served"], fresh_share=f["fresh_share"], mean_serves=f["mean_serves_per_image"],
                   waited_s=f["waited_s"], distinct_synthetic=f["distinct_served"])
    return out


def _worker(cache, source: str, *, threads: int, min_fresh: int, seed: int):
    from synthaug.generation.worker import GenerationWorker

    overrides = dict(GENERATION, batch_size=16)
    if source.startswith("builtin:"):
        # the base model without a LoRA: its Shirt slot (never trained, so not shirts; the cost is the same)
        overrides["label"] = 6
    spec = {"source": source, "overrides": overrides}
    return GenerationWorker(cache, spec, min_fresh=min_fresh, max_items=max(min_fresh, 1_000_000), batch_size=16, seed=seed, num_threads=threads)


def _pregenerate(folder: Path, source: str, n: int, threads: int, classes) -> Dict[str, Any]:
    """The worker alone: time to fill ``n`` images and its rate after the first append."""
    from synthaug.cache.store import SyntheticCache

    cache = SyntheticCache(folder, label_names=classes)
    t0 = time.perf_counter()
    first_t = first_n = None
    with _worker(cache, source, threads=threads, min_fresh=n, seed=0) as worker:
        while len(cache) < n:
            worker.raise_if_failed()
            k = len(cache)
            if k and first_t is None:
                first_t, first_n = time.perf_counter(), k
            time.sleep(0.05)
        done = time.perf_counter()
    total = len(cache)
    rate = (total - first_n) / (done - first_t) if first_t is not None and done > first_t and total > first_n else total / (done - t0)
    return {"cache": cache, "wall_s": done - t0, "images": total, "generator_images_per_s": rate}


def run(quick: bool = False, *, steps: Optional[int] = None, ratio: float = 0.25, batch_size: int = 64, prefill: Optional[int] = None,
        threads: int = 1, adapter: Optional[str] = None, per_class: int = 1000, shots: int = 30, out: Optional[str] = None) -> Dict[str, Any]:
    import torch

    from synthaug.cache.store import SyntheticCache
    from synthaug.evaluation.arms import fashion_mnist_transform, mixed_arm_loader, real_only_loader

    steps = steps or (20 if quick else 600)
    prefill = prefill or (16 if quick else 256)
    source = adapter or "builtin:fashion-mnist-ddpm"
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    real, rare, classes = _data(per_class if not quick else 200, shots)
    tf = fashion_mnist_transform()
    tmp = Path(tempfile.mkdtemp(prefix="synthaug-overlap-"))
    rows: List[Dict[str, Any]] = []
    try:
        gen = _pregenerate(tmp / "prefilled.lmdb", source, prefill, threads, classes)
        g = gen["generator_images_per_s"]
        rows.append({"run": "generate", "wall_s": gen["wall_s"], "generator_images_per_s": g, "generated": gen["images"]})

        r_only = _train("real_only", real_only_loader(real, batch_size=batch_size, seed=0, transform=tf), steps=steps, rare=rare)
        rows.append({"run": "real_only", "wall_s": r_only["train_s"], **r_only})

        loader, sampler = mixed_arm_loader(real, gen["cache"], ratio=ratio, batch_size=batch_size, seed=0, transform=tf, consumer="pregenerate")
        pre = _train("pregenerate", loader, steps=steps, rare=rare, sampler=sampler)
        rows.append({"run": "pregenerate", "wall_s": gen["wall_s"] + pre["train_s"], "generator_images_per_s": g, "generated": gen["images"], **pre})
        gen["cache"].close()

        def on_the_fly(name: str, max_reuse: Optional[int]) -> Dict[str, Any]:
            cache = SyntheticCache(tmp / f"{name}.lmdb", label_names=classes)
            loader, sampler = mixed_arm_loader(real, cache, ratio=ratio, batch_size=batch_size, seed=0, transform=tf, consumer=name,
                                               max_reuse=max_reuse, wait_timeout=1800)
            t0 = time.perf_counter()
            with _worker(cache, source, threads=threads, min_fresh=1_000_000, seed=0):
                res = _train(name, loader, steps=steps, rare=rare, sampler=sampler)
                wall = time.perf_counter() - t0
            made = len(cache)
            cache.close()
            alone = max(r_only["train_s"], made / g)
            row = {"run": name, "wall_s": wall, **res, "generated": made, "generator_images_per_s": made / wall, "max_reuse": max_reuse,
                   "wall_vs_max_alone": wall / alone}
            if max_reuse is not None:
                # the rule's prediction: a cap that binds slows training to (1 + k)·g / r samples/s
                row["predicted_samples_per_s"] = min(r_only["train_samples_per_s"], (1 + max_reuse) * g / ratio)
            return row

        otf = on_the_fly("on_the_fly", None)
        rows.append(otf)
        consumption = ratio * r_only["train_samples_per_s"]  # synthetic draws per second the trainer wants
        k = max(0, math.ceil(consumption / g) - 1)
        if not quick:
            rows.append(on_the_fly("on_the_fly_capped", k))
            rows.append(on_the_fly("on_the_fly_capped_tight", max(0, (k + 1) // 3 - 1)))  # a cap that binds: ~1/3 of the no-wait value
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads_before)
    columns = ["run", "wall_s", "train_samples_per_s", "generator_images_per_s", "generated", "synthetic_draws", "fresh_share",
               "mean_serves", "waited_s", "max_reuse", "predicted_samples_per_s", "wall_vs_max_alone"]
    print(f"overlap: {steps} steps, batch {batch_size}, ratio {ratio}, {threads} torch thread(s) each for trainer and worker, "
          f"generator {source} ({GENERATION['scheduler']}, {GENERATION['num_inference_steps']} steps, guidance {GENERATION['guidance_scale']})")
    print_table(rows, columns)
    rule = {"consumption_draws_per_s": consumption, "generator_images_per_s": g, "fresh_share_bound": min(1.0, g / consumption),
            "max_reuse_for_no_wait": k}
    print(f"rule: the trainer wants {consumption:.0f} synthetic draws/s, the generator makes {g:.2f} images/s: at most "
          f"{100 * rule['fresh_share_bound']:.1f}% of draws can be fresh; max_reuse >= {k} keeps training from waiting")
    settings = {"steps": steps, "ratio": ratio, "batch_size": batch_size, "prefill": prefill, "threads": threads, "source": source,
                "generation": GENERATION, "quick": quick, "real_train_images": len(real)}
    path = write_result("overlap" + ("_quick" if quick else ""), {"settings": settings, "rows": rows, "rule": rule}, out)
    print(f"wrote {path}")
    return {"rows": rows, "rule": rule, "settings": settings}


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 steps, 16 pre-generated images, no capped run (a smoke test, not figures)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 600, quick 20)")
    p.add_argument("--ratio", type=float, default=0.25, help="synthetic share of every batch (default 0.25)")
    p.add_argument("--prefill", type=int, default=None, help="images pre-generated for the pregenerate run (default 256, quick 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the worker, each (default 1)")
    p.add_argument("--adapter", default=None, help="generator: an adapter folder (default: the built-in model)")
    p.add_argument("--out", default=None, help="folder for overlap.json (overlap_quick.json with --quick; default benchmarks/results)")
    args = p.parse_args(argv)
    if not 0 < args.ratio < 1:
        p.error(f"--ratio must be in (0, 1), got {args.ratio}")
    return run(args.quick, steps=args.steps, ratio=args.ratio, prefill=args.prefill, threads=args.threads, adapter=args.adapter, out=args.out)


if __name__ == "__main__":  # pragma: no cover
    main()
