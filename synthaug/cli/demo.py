"""``synthaug demo``: the whole method on the embedded default model, offline, on a CPU."""

from __future__ import annotations

import argparse

from synthaug.cli.generate import strength_arg
from synthaug.evaluation.demo import DEMO_MODES, DemoConfig, run_demo

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__})
    run_demo(cfg)
    return 0


def register(sub) -> None:
    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="run the whole method on Fashion-MNIST with the built-in model (CPU, minutes)",
        description=__doc__ + " LoRA on a few real rare-class images, a background worker filling the "
        "cache, the same CNN trained real-only / oversampled / with synthetic images, evaluated on the real test set.",
    )
    p.add_argument("--out", default=d.out, help=f"report folder, replaced if it holds an earlier demo (default: {d.out})")
    p.add_argument("--rare-class", default=d.rare_class, help=f"the rare class (default: {d.rare_class}, the class the built-in model never saw)")
    p.add_argument("--shots", type=int, default=d.shots, help=f"real training images of the rare class (default: {d.shots})")
    p.add_argument("--per-class", type=int, default=d.per_class, help=f"real training images of every other class (default: {d.per_class})")
    p.add_argument("--ratio", type=float, default=d.ratio, help=f"synthetic share of every batch (default: {d.ratio})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the split, LoRA, generation and training (default: {d.seed})")
    p.add_argument("--data", default=d.data, help="folder with the Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--model", default=d.model, help=f"base model (default: {d.model})")
    p.add_argument("--lora-steps", type=int, default=d.lora_steps, help=f"LoRA training steps (default: {d.lora_steps})")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default: {d.lora_rank})")
    p.add_argument("--lora-lr", type=float, default=d.lora_lr, help="LoRA learning rate (default: the backend's, 1e-3 for the pixel DDPM)")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help=f"classifier training steps per arm (default: {d.train_steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"classifier batch size (default: {d.batch_size})")
    p.add_argument("--generation-steps", type=int, default=d.generation_steps, help=f"denoising steps per synthetic image (default: {d.generation_steps})")
    p.add_argument("--scheduler", default=d.scheduler, choices=["ddim", "dpm++", "unipc"], help=f"sampler of the generator (default: {d.scheduler})")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale, help=f"classifier-free guidance (default: {d.guidance_scale})")
    p.add_argument("--generation", default=d.generation, choices=list(DEMO_MODES),
                   help=f"how the synthetic images are made: img2img from the real shots, or txt2img from noise (default: {d.generation})")
    p.add_argument("--strength", type=strength_arg, default=d.strength,
                   help=f"img2img strengths, one drawn per image, comma-separated (default: {','.join(f'{v:g}' for v in d.strength)})")
    p.add_argument("--min-fresh", type=int, default=d.min_fresh, help=f"unconsumed records the worker keeps ready (default: {d.min_fresh})")
    p.add_argument("--max-items", type=int, default=d.max_items, help=f"records the cache keeps at most (default: {d.max_items})")
    p.add_argument("--test-size", type=int, default=d.test_size, help="evaluate on a random subset of the test set (default: all 10,000)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not an earlier demo report (default: refuse)")
    p.set_defaults(func=run)
