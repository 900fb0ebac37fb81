"""Overlap of generation and training: the same classifier training run three ways in one
invocation — real-only, pre-generate-then-train, and on-the-fly (GenerationWorker + sampler).

Settings (``--setting``):

* ``fmnist`` (default): the demo's imbalanced Fashion-MNIST split (30 real shirts, 1,000 images
  of every other class), the small CNN, batch 64, ratio 0.25, ``--steps`` optimizer steps; the
  generator is the embedded pixel DDPM (``builtin:fashion-mnist-ddpm`` conditioned on its
  untrained Shirt slot — the images are not shirts without a LoRA, the cost is the same — or
  ``--adapter``) with its demo settings (DPM-Solver++, 20 steps, guidance 2, batch 16).
* ``rgb256``: 256×256 RGB JPEGs in a torchvision ``ImageFolder`` (two classes cut from
  scikit-learn's bundled photographs: 600 crops of ``china.jpg``, 30 of the rare ``flower.jpg``),
  torchvision's ResNet-18 (ImageNet stem), batch 32, ratio 0.25; the generator is a
  Stable-Diffusion-1.5-architecture pipeline with random weights (written once to
  ``--sd-folder``, or to a temp folder; the cost is the architecture's) at 256 px, "a photo of a
  flower", DPM-Solver++ 20 steps, guidance 7.5, batch 1, in bf16 where the CPU has native bf16
  (AMX/AVX-512-BF16; 2.5× faster than fp32 here) and fp32 otherwise. With ``--quick`` the
  generator is a tiny SD-1.x pipeline with random weights (the same code path, not the cost).

The trainer and the worker each get ``--threads`` torch threads (default 1: on a 2-core machine
each has a core of its own).

Runs, in order:

1. ``generate``: the worker alone fills an empty cache with ``--prefill`` images: the
   generator's own rate (images/s after its first append, so model loading is excluded; with
   ``--quick`` the prefill is one append, and the rate includes loading) and the pre-generation
   time (including loading).
2. ``real_only``: training on the real data alone. Every training run first *prepares*, as a
   training script does: reads the real data from its files, builds the loader and the
   classifier (``prepare_s``); its wall time is preparation plus training.
3. ``pregenerate``: training mixed at the ratio from that pre-filled cache (reusing its images);
   its wall time is the pre-generation time plus preparation and training.
4. ``on_the_fly``: a new, empty cache; the worker starts first (a new process: imports, model
   load, a first batch of 4 images), and the script prepares meanwhile, then trains, mixing with
   ``on_exhausted="reuse"`` (fresh images first, reuse when none is fresh; it waits only for the
   very first image). Wall time from the worker's start to the end of training.
5. ``on_the_fly_capped`` and ``on_the_fly_capped_tight`` (``fmnist`` only, not in ``--quick``):
   the same with ``max_reuse = k``, where ``k`` is the freshness rule's no-wait value for the
   measured rates (``k = ceil(c / g) - 1`` for consumption ``c`` and generation ``g``, see the
   README), and with a third of it, a cap that binds: the rule predicts training then runs at
   ``(1 + k)·g / r`` samples/s (``predicted_samples_per_s``), which the run measures.

Reported per run: wall time, preparation and training time, training samples/s, generator images/s, synthetic draws, fresh share
of them, mean serves per distinct synthetic image, seconds the sampler waited; and the goal's
ratio: on-the-fly wall / max(training alone (preparation + training, the ``real_only`` wall),
generating the same images alone (at the generator's own rate)).

    python benchmarks/overlap.py [--setting fmnist|rgb256] [--quick] [--steps N] [--ratio R]
                                 [--threads T] [--sd-folder DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from synthaug.benchmarks.common import print_table, realistic_images, write_result
from synthaug.benchmarks.generate import write_random_sd_pipeline
from synthaug.cache.store import SyntheticCache
from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.data.splits import few_shot_split
from synthaug.data.transforms import fashion_mnist_transform
from synthaug.evaluation.arms import mixed_arm_loader, real_only_loader
from synthaug.classifier import build_classifier, train_classifier
from synthaug.generation.worker import GenerationWorker

__all__ = ["run", "main"]

SETTINGS = ("fmnist", "rgb256")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Setting:
    """One training set-up, run the three ways."""

    name: str
    real: Any  # dataset of (PIL image, class index)
    rare: int
    classes: List[str]
    transform: Callable
    model: str
    in_channels: int
    image_size: int
    batch_size: int
    source: str  # the generator: builtin name, adapter or pipeline folder
    generation: Dict[str, Any]  # generator overrides (load_generator's keywords)
    worker_batch: int
    worker_device: str
    reload: Callable[[], Any]  # the real dataset read again from its files (timed as preparation)


def _cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AMX or AVX-512-BF16): then bf16 is the faster CPU dtype."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _fmnist(quick: bool, *, per_class: int, shots: int, adapter: Optional[str], worker_device: str) -> Setting:
    import torch

    def load():  # the demo's split, read from the files (again for each run's preparation)
        data = FashionMNIST(train=True)
        split = few_shot_split(data, "Shirt", shots=shots, per_class=200 if quick else per_class, seed=0)
        return data, split, torch.utils.data.Subset(data, split.train.tolist())

    train, split, real = load()
    generation = {"num_inference_steps": 20, "scheduler": "dpm++", "guidance_scale": 2.0}
    if adapter is None:
        # the base model without a LoRA: its Shirt slot (never trained, so not shirts; the cost is the same)
        generation["label"] = split.rare_class
    return Setting("fmnist", real, split.rare_class, list(train.classes), fashion_mnist_transform(), "small-cnn", 1, 28, 64,
                   adapter or "builtin:fashion-mnist-ddpm", generation, 16, worker_device, lambda: load()[2])


def _rgb256(quick: bool, folder: Path, *, shots: int, sd_folder: Optional[str], worker_device: str) -> Setting:
    from PIL import Image
    from torchvision import datasets
    from torchvision import transforms as T

    size = 256
    for name, photo, n, seed in (("china", 0, 16 if quick else 600, 1), ("flower", 1, 4 if quick else shots, 2)):
        (folder / "photos" / name).mkdir(parents=True)
        for i, image in enumerate(realistic_images(n, size, 3, seed=seed, photo=photo)):
            Image.fromarray(image).save(folder / "photos" / name / f"{i:04d}.jpg", quality=90)
    real = datasets.ImageFolder(folder / "photos")
    arch = "tiny" if quick else "sd15"
    pipeline = Path(sd_folder) if sd_folder and not quick else folder / f"sd-{arch}"
    if not (pipeline / "model_index.json").is_file():
        print(f"writing a random-weight {arch} Stable Diffusion pipeline to {pipeline} ...", flush=True)
        write_random_sd_pipeline(pipeline, arch)
    generation = {"prompt": "a photo of a flower", "height": size, "width": size, "num_inference_steps": 2 if quick else 20,
                  "guidance_scale": 7.5, "scheduler": "dpm++", "label": real.class_to_idx["flower"]}
    if worker_device == "cpu":
        generation["dtype"] = "bf16" if _cpu_has_bf16() else "fp32"
    tf = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return Setting("rgb256", real, real.class_to_idx["flower"], list(real.classes), tf, "resnet18", 3, size, 8 if quick else 32,
                   str(pipeline), generation, 1, worker_device, lambda: datasets.ImageFolder(folder / "photos"))


def _train(name: str, setting: Setting, make_loader: Callable[[Any], Any], *, steps: int, device: str) -> Dict[str, Any]:
    """Prepare (the real data read again, the loader, the classifier built: what a training script
    does before its first step), then train; both timed (``prepare_s``, ``train_s``)."""
    import torch

    t0 = time.perf_counter()
    real = setting.reload()
    loader, sampler = make_loader(real)
    torch.manual_seed(0)
    net = build_classifier(setting.model, in_channels=setting.in_channels, num_classes=len(setting.classes), image_size=setting.image_size)
    t1 = time.perf_counter()
    training = train_classifier(net, loader, steps=steps, device=device, progress=True, desc=name)
    t2 = time.perf_counter()
    wall = t2 - t1
    out = {"prepare_s": t1 - t0, "train_s": wall, "prepare_and_train_s": t2 - t0, "samples": training["samples"],
           "train_samples_per_s": training["samples"] / wall}
    if sampler is not None:
        f = sampler.freshness()
        out.update(synthetic_draws=f["served"], fresh_share=f["fresh_share"], mean_serves=f["mean_serves_per_image"],
                   waited_s=f["waited_s"], distinct_synthetic=f["distinct_served"])
    return out


def _worker(cache, setting: Setting, *, threads: int, min_fresh: int, seed: int):
    spec = {"source": setting.source, "overrides": dict(setting.generation, batch_size=setting.worker_batch)}
    return GenerationWorker(cache, spec, min_fresh=min_fresh, max_items=max(min_fresh, 1_000_000), batch_size=setting.worker_batch,
                            seed=seed, num_threads=threads, device=setting.worker_device)


def _pregenerate(folder: Path, setting: Setting, n: int, threads: int) -> Dict[str, Any]:
    """The worker alone: time to fill ``n`` images and its rate after the first append."""
    from synthaug.progress import progress_bar

    cache = SyntheticCache(folder, label_names=setting.classes)
    t0 = time.perf_counter()
    first_t = first_n = None
    bar = progress_bar(total=n, desc="generate", unit="img")
    with _worker(cache, setting, threads=threads, min_fresh=n, seed=0) as worker:
        while len(cache) < n:
            worker.raise_if_failed()
            k = len(cache)
            if k and first_t is None:
                first_t, first_n = time.perf_counter(), k
            bar.update(min(k, n) - bar.n)
            time.sleep(0.05)
        done = time.perf_counter()
    bar.update(n - bar.n)
    bar.close()
    total = len(cache)
    rate = (total - first_n) / (done - first_t) if first_t is not None and done > first_t and total > first_n else total / (done - t0)
    return {"cache": cache, "wall_s": done - t0, "images": total, "generator_images_per_s": rate}


def run(quick: bool = False, *, setting: str = "fmnist", steps: Optional[int] = None, ratio: float = 0.25, prefill: Optional[int] = None,
        threads: int = 1, adapter: Optional[str] = None, per_class: int = 1000, shots: int = 30, sd_folder: Optional[str] = None,
        device: str = "cpu", worker_device: str = "cpu", out: Optional[str] = None) -> Dict[str, Any]:
    import torch

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {SETTINGS}")
    if adapter is not None and setting != "fmnist":
        raise ValueError("--adapter applies to the fmnist setting (rgb256 uses a random-weight SD-1.5 pipeline)")
    big = setting == "rgb256"
    steps = steps or (2 if big else 20) if quick else steps or (40 if big else 600)
    prefill = prefill or (2 if big else 16) if quick else prefill or (8 if big else 256)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="synthaug-overlap-"))
    rows: List[Dict[str, Any]] = []
    try:
        s = (_rgb256(quick, tmp, shots=shots, sd_folder=sd_folder, worker_device=worker_device) if big
             else _fmnist(quick, per_class=per_class, shots=shots, adapter=adapter, worker_device=worker_device))
        batch_size = s.batch_size
        gen = _pregenerate(tmp / "prefilled.lmdb", s, prefill, threads)
        g = gen["generator_images_per_s"]
        rows.append({"run": "generate", "wall_s": gen["wall_s"], "generator_images_per_s": g, "generated": gen["images"]})

        r_only = _train("real_only", s, lambda real: (real_only_loader(real, batch_size=batch_size, seed=0, transform=s.transform), None),
                        steps=steps, device=device)
        rows.append({"run": "real_only", "wall_s": r_only["prepare_and_train_s"], **r_only})

        pre = _train("pregenerate", s, lambda real: mixed_arm_loader(real, gen["cache"], ratio=ratio, batch_size=batch_size, seed=0,
                                                                     transform=s.transform, consumer="pregenerate"), steps=steps, device=device)
        rows.append({"run": "pregenerate", "wall_s": gen["wall_s"] + pre["prepare_and_train_s"], "generator_images_per_s": g,
                     "generated": gen["images"], **pre})
        gen["cache"].close()

        def on_the_fly(name: str, max_reuse: Optional[int]) -> Dict[str, Any]:
            # the order a training script should use: start the worker (a new process: imports,
            # model load, first batch), then read the data and build the classifier meanwhile
            cache = SyntheticCache(tmp / f"{name}.lmdb", label_names=s.classes)
            t0 = time.perf_counter()
            with _worker(cache, s, threads=threads, min_fresh=1_000_000, seed=0):
                res = _train(name, s, lambda real: mixed_arm_loader(real, cache, ratio=ratio, batch_size=batch_size, seed=0, transform=s.transform,
                                                                    consumer=name, max_reuse=max_reuse, wait_timeout=1800),
                             steps=steps, device=device)
                wall = time.perf_counter() - t0
            made = len(cache)
            cache.close()
            alone = max(r_only["prepare_and_train_s"], made / g)
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
        if not quick and not big:
            rows.append(on_the_fly("on_the_fly_capped", k))
            rows.append(on_the_fly("on_the_fly_capped_tight", max(0, (k + 1) // 3 - 1)))  # a cap that binds: ~1/3 of the no-wait value
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads_before)
    columns = ["run", "wall_s", "prepare_s", "train_s", "train_samples_per_s", "generator_images_per_s", "generated", "synthetic_draws", "fresh_share",
               "mean_serves", "waited_s", "max_reuse", "predicted_samples_per_s", "wall_vs_max_alone"]
    gen_desc = ", ".join(f"{key} {value}" for key, value in s.generation.items() if key not in ("label", "prompt"))
    print(f"overlap ({s.name}): {s.model} at {s.image_size} px, {steps} steps, batch {batch_size}, ratio {ratio}, {threads} torch thread(s) "
          f"each for trainer ({device}) and worker; generator {s.source if not big else 'random-weight SD pipeline'} ({gen_desc})")
    print_table(rows, columns)
    rule = {"consumption_draws_per_s": consumption, "generator_images_per_s": g, "fresh_share_bound": min(1.0, g / consumption),
            "max_reuse_for_no_wait": k}
    print(f"rule: the trainer wants {consumption:.2f} synthetic draws/s, the generator makes {g:.3g} images/s: at most "
          f"{100 * rule['fresh_share_bound']:.1f}% of draws can be fresh; max_reuse >= {k} keeps training from waiting")
    settings = {"setting": s.name, "model": s.model, "image_size": s.image_size, "steps": steps, "ratio": ratio, "batch_size": batch_size,
                "prefill": prefill, "threads": threads, "device": device, "worker_device": worker_device,
                "source": s.source if not big else f"random-weight {'tiny SD-1.x' if quick else 'SD-1.5'} pipeline",
                "generation": s.generation, "quick": quick, "real_train_images": len(s.real)}
    name = "overlap" + ("_rgb256" if big else "") + ("_quick" if quick else "")
    path = write_result(name, {"settings": settings, "rows": rows, "rule": rule}, out)
    print(f"wrote {path}")
    return {"rows": rows, "rule": rule, "settings": settings}


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=SETTINGS, default="fmnist",
                   help="fmnist: 28 px, small CNN, the embedded DDPM; rgb256: 256 px RGB, ResNet-18, an SD-1.5-architecture generator")
    p.add_argument("--quick", action="store_true",
                   help="a few steps and pre-generated images, no capped run; rgb256 with a tiny SD pipeline (a smoke test, not figures)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default fmnist 600, rgb256 40; quick 20 and 2)")
    p.add_argument("--ratio", type=float, default=0.25, help="synthetic share of every batch (default 0.25)")
    p.add_argument("--prefill", type=int, default=None,
                   help="images pre-generated for the pregenerate run (default fmnist 256, rgb256 8; quick 16 and 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the worker, each (default 1)")
    p.add_argument("--adapter", default=None, help="fmnist generator: an adapter folder (default: the built-in model)")
    p.add_argument("--sd-folder", default=None, help="rgb256: reuse (or write once) the random SD-1.5 pipeline here instead of a temp folder "
                   "(--quick ignores it: it writes a tiny pipeline to a temp folder)")
    p.add_argument("--device", default="cpu", help="the trainer's device (default cpu)")
    p.add_argument("--worker-device", default="cpu", help="the generator's device, e.g. cuda:0 (default cpu)")
    p.add_argument("--out", default=None,
                   help="folder for overlap[_rgb256].json (…_quick.json with --quick; default benchmarks/results)")
    args = p.parse_args(argv)
    if not 0 < args.ratio < 1:
        p.error(f"--ratio must be in (0, 1), got {args.ratio}")
    if args.adapter and args.setting != "fmnist":
        p.error("--adapter applies to --setting fmnist")
    return run(args.quick, setting=args.setting, steps=args.steps, ratio=args.ratio, prefill=args.prefill, threads=args.threads,
               adapter=args.adapter, sd_folder=args.sd_folder, device=args.device, worker_device=args.worker_device, out=args.out)


if __name__ == "__main__":  # pragma: no cover
    main()
