"""``synthaug demo``: the whole method on the embedded default, on a CPU, in a few minutes.

1. Fashion-MNIST, made imbalanced: the rare class ("Shirt") keeps ``shots`` real training
   images, every other class ``per_class``.
2. A LoRA on the built-in pixel DDPM (pretrained without the rare class) learns the rare class
   from those ``shots`` images.
3. A GenerationWorker process fills an LMDB cache with synthetic rare-class images while the
   classifiers train (it starts first, so the cache fills during the control arms too). By
   default each image is made around a real shot (``generation="img2img"``: SDEdit from one of
   the ``shots`` at a strength drawn per image from ``strength``, as DA-Fusion does): of the
   generation modes, the one the study chose on validation most often and the best in rare-class
   AP (README, "What the study of generation around the real data shows"; there, on 4 of 5 seeds
   the chosen pool was half real repeats, which the sweep builds and this demo does not).
   ``generation="txt2img"`` samples the LoRA from noise.
4. The same small CNN is trained the same number of steps in three arms: ``real_only``,
   ``oversampled`` (the real rare images repeated, mixed by the same sampler at the same ratio:
   the matched-cardinality control), and ``synthetic`` (the cache at ``ratio``).
5. Each is evaluated on the real test set; the report folder gets ``report.json``,
   ``arms.png`` (rare-class recall/precision/F1 per arm), ``samples.png`` (real vs synthetic)
   and the adapter's own validation grid and loss curve.

The two CPU cores are split: the worker and the trainer get one torch thread each (two
processes spinning on two threads each slow each other down a hundredfold here).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from synthaug.cache.store import SyntheticCache
from synthaug.data.fashion_mnist import FashionMNIST
from synthaug.data.splits import few_shot_split, write_images
from synthaug.data.transforms import WithTransform, fashion_mnist_transform
from synthaug.evaluation.arms import mixed_arm_loader, real_only_loader, real_rare_cache, train_and_evaluate
from synthaug.finetune import finetune_lora
from synthaug.generation.modes import parse_strengths
from synthaug.generation.worker import GenerationWorker
from synthaug.imaging import image_grid
from synthaug.outputs import jsonable, output_dir, write_json

__all__ = ["DEMO_MODES", "DemoConfig", "run_demo"]

#: the generation modes the demo runs: from the LoRA alone, or SDEdit from the rare class's shots
DEMO_MODES = ("txt2img", "img2img")


@dataclass
class DemoConfig:
    """Settings of ``synthaug demo`` (see ``synthaug demo --help``)."""

    out: str = "demo-report"
    rare_class: str = "Shirt"
    shots: int = 30
    per_class: int = 1000
    ratio: float = 0.25
    seed: int = 0
    data: Optional[str] = None
    model: str = "builtin:fashion-mnist-ddpm"
    lora_steps: int = 400
    lora_rank: int = 8
    lora_lr: Optional[float] = None
    train_steps: int = 600
    batch_size: int = 64
    generation_steps: int = 20
    scheduler: str = "dpm++"
    guidance_scale: float = 2.0
    generation: str = "img2img"
    strength: Tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    min_fresh: int = 10000  # more than the synthetic arm draws: the worker's core never idles
    max_items: int = 20000
    test_size: Optional[int] = None
    overwrite: bool = False

    def check(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.generation not in DEMO_MODES:
            raise ValueError(f"--generation must be one of {', '.join(DEMO_MODES)}, got {self.generation!r}")
        self.strength = parse_strengths(self.strength)
        if self.max_items < self.min_fresh:
            raise ValueError(f"--max-items ({self.max_items}) must be >= --min-fresh ({self.min_fresh})")
        for name in ("shots", "per_class", "lora_steps", "train_steps", "batch_size", "generation_steps", "min_fresh", "max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def _is_demo_report(out: Path) -> bool:
    return (out / "report.json").exists() or (out / "demo.log").exists()


def _log(out: Path, message: str) -> None:
    print(message, flush=True)
    with open(out / "demo.log", "a") as f:
        f.write(message + "\n")


def run_demo(config: DemoConfig, *, progress: bool = True) -> Dict[str, Any]:
    """Run the demo; returns the report (also written to ``OUT/report.json``)."""
    import torch

    cfg = config
    cfg.check()
    # an earlier demo report is replaced; any other non-empty folder only with --overwrite
    out = output_dir(cfg.out, overwrite=cfg.overwrite, empty=True, ours=_is_demo_report, what="--out",
                     hint="it is not an earlier demo report; choose another --out or pass --overwrite")
    timings: Dict[str, float] = {}
    t_start = time.time()

    # 1. data -----------------------------------------------------------------------------
    t0 = time.time()
    train_full = FashionMNIST(cfg.data, train=True)
    test_full = FashionMNIST(cfg.data, train=False)
    split = few_shot_split(train_full, cfg.rare_class, shots=cfg.shots, per_class=cfg.per_class, seed=cfg.seed)
    rare = split.rare_class
    classes = list(train_full.classes)
    real_train = torch.utils.data.Subset(train_full, split.train.tolist())
    write_images(train_full, split.rare, out / "train_images", prefix=classes[rare].replace("/", "-").lower())
    tf = fashion_mnist_transform()
    test = WithTransform(test_full, tf)
    if cfg.test_size:
        test = torch.utils.data.Subset(test, np.random.default_rng(cfg.seed).choice(len(test_full), cfg.test_size, replace=False).tolist())
    test_loader = torch.utils.data.DataLoader(test, batch_size=500)
    timings["data_s"] = time.time() - t0
    _log(out, f"data: {len(real_train)} real training images ({cfg.shots} of '{classes[rare]}', {cfg.per_class} of each other class); {len(test)} real test images")

    # 2. LoRA -----------------------------------------------------------------------------
    t0 = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    adapter = finetune_lora(
        cfg.model, out / "train_images", out / "adapter", class_name=classes[rare], steps=cfg.lora_steps,
        rank=cfg.lora_rank, lr=cfg.lora_lr, seed=cfg.seed, progress=progress, min_images=min(5, cfg.shots),
    )
    timings["lora_s"] = time.time() - t0
    _log(out, f"LoRA: {cfg.lora_steps} steps on {cfg.shots} images in {timings['lora_s']:.0f} s -> {adapter}")

    # 3. worker filling the cache while the arms train -------------------------------------------
    cache = SyntheticCache(out / "cache.lmdb", label_names=classes)
    overrides = {"num_inference_steps": cfg.generation_steps, "scheduler": cfg.scheduler, "guidance_scale": cfg.guidance_scale, "batch_size": 16}
    if cfg.generation == "img2img":  # each image made from one of the shots, at a strength drawn per image
        overrides.update(mode="img2img", source_images=str(out / "train_images"), strength=list(cfg.strength))
    spec = {"source": str(adapter), "overrides": overrides}
    torch.set_num_threads(1)
    worker = GenerationWorker(cache, spec, min_fresh=cfg.min_fresh, max_items=cfg.max_items, batch_size=16, seed=cfg.seed * 1_000_000, num_threads=1)
    rare_cache = real_rare_cache([train_full[int(i)][0] for i in split.rare], rare, out / "real_rare.lmdb", label_names=classes)
    arms: List[Dict[str, Any]] = []
    common = dict(rare=rare, steps=cfg.train_steps, seed=cfg.seed, progress=progress)
    t0 = time.time()
    with worker:  # started here; stopped (and its error raised, if any) on exit
        loader = real_only_loader(real_train, batch_size=cfg.batch_size, seed=cfg.seed, transform=tf)
        arms.append(train_and_evaluate("real_only", loader, test_loader, **common).to_dict())
        _log(out, _arm_line(arms[-1]))
        loader, sampler = mixed_arm_loader(real_train, rare_cache, ratio=cfg.ratio, batch_size=cfg.batch_size, seed=cfg.seed, transform=tf, consumer="demo-oversampled")
        arms.append(train_and_evaluate("oversampled", loader, test_loader, sampler=sampler, **common).to_dict())
        _log(out, _arm_line(arms[-1]))
        cached_before = len(cache)
        loader, sampler = mixed_arm_loader(real_train, cache, ratio=cfg.ratio, batch_size=cfg.batch_size, seed=cfg.seed, transform=tf, consumer="demo-synthetic")
        arms.append(train_and_evaluate("synthetic", loader, test_loader, sampler=sampler, **common).to_dict())
        arms[-1]["cache_records_at_start"] = cached_before
        _log(out, _arm_line(arms[-1]))
        worker_status = worker.stop()
    timings["arms_s"] = time.time() - t0
    cache_stats = cache.stats()

    # 4. report ----------------------------------------------------------------------------
    synthetic_images = [r.image for r in cache.get_many(cache.seqs()[-16:])]
    real_images = [np.asarray(train_full[int(i)][0])[:, :, None] for i in split.rare[:16]]
    _plot_samples(real_images, synthetic_images, out / "samples.png", classes[rare], cfg.generation)
    _plot_arms(arms, out / "arms.png", cfg, classes[rare])
    timings["total_s"] = time.time() - t_start
    report = {
        "config": asdict(cfg),
        "rare_class": {"index": rare, "name": classes[rare]},
        "data": {"train": len(real_train), "rare_train": cfg.shots, "test": len(test), "rare_test": arms[0]["metrics"]["rare_support"]},
        "arms": arms,
        "worker": jsonable(worker_status),
        "cache": jsonable(cache_stats),
        "adapter": str(adapter),
        "timings": timings,
        "files": {"report": "report.json", "arms": "arms.png", "samples": "samples.png", "validation": "adapter/validation.png", "loss": "adapter/loss.png"},
    }
    write_json(out / "report.json", report)
    cache.close()
    rare_cache.close()
    _log(out, _table(arms))
    _log(out, f"demo done in {timings['total_s']:.0f} s: report, plots and samples in {out}/ (report.json, arms.png, samples.png)")
    return report


def _arm_line(arm: Dict[str, Any]) -> str:
    m = arm["metrics"]
    extra = ""
    s = arm.get("sampler") or {}
    if s:
        extra = f"; synthetic draws {s.get('served', '?')} (fresh {s.get('fresh', '?')}, reused {s.get('reused', '?')}, waited {float(s.get('waited_s', 0) or 0):.1f} s)"
    return (
        f"{arm['arm']:<12} rare recall {m['rare_recall']:.3f}  precision {m['rare_precision']:.3f}  F1 {m['rare_f1']:.3f}  "
        f"AP {m.get('rare_average_precision', float('nan')):.3f}  accuracy {m['accuracy']:.3f}  ({arm['training']['wall_s']:.0f} s){extra}"
    )


def _table(arms: List[Dict[str, Any]]) -> str:
    lines = ["", "| arm | rare recall | rare precision | rare F1 | rare AP | accuracy |", "|---|---|---|---|---|---|"]
    for a in arms:
        m = a["metrics"]
        lines.append(f"| {a['arm']} | {m['rare_recall']:.3f} | {m['rare_precision']:.3f} | {m['rare_f1']:.3f} | {m.get('rare_average_precision', float('nan')):.3f} | {m['accuracy']:.3f} |")
    return "\n".join(lines)


def _plot_samples(real: List[np.ndarray], synthetic: List[np.ndarray], path: Path, name: str, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8), dpi=110)
    for ax, images, title in ((axes[0], real, f"real '{name}' (training shots)"), (axes[1], synthetic, f"synthetic '{name}' (LoRA {mode}, newest records)")):
        if images:
            ax.imshow(image_grid(images, cols=4, pad=2, background=255)[:, :, 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_arms(arms: List[Dict[str, Any]], path: Path, cfg: DemoConfig, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("rare_recall", "recall"), ("rare_precision", "precision"), ("rare_f1", "F1"), ("rare_average_precision", "AP")]
    x = np.arange(len(keys))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for i, arm in enumerate(arms):
        values = [arm["metrics"].get(k, 0.0) for k, _ in keys]
        bars = ax.bar(x + (i - (len(arms) - 1) / 2) * width, values, width, label=arm["arm"])
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(x, [k for _, k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"'{name}' on the real test set")
    ax.set_title(f"{cfg.shots} real '{name}' images; {cfg.generation} at ratio {cfg.ratio}; {cfg.train_steps} steps; seed {cfg.seed}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
