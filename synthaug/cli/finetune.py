"""``synthaug finetune``: train a LoRA adapter on a folder of real images of one class."""

from __future__ import annotations

import argparse
import json
import warnings

from synthaug.finetune import finetune_lora

__all__ = ["register", "add_class_arguments", "classes_from_args"]


def run(args: argparse.Namespace) -> int:
    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "label": args.label,
        "class_name": args.class_name,
        "label_names": classes_from_args(args),
        "rank": args.rank,
        "alpha": args.alpha,
        "lr": args.lr,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "target_modules": args.target_modules,
        "train_class_embedding": not args.no_train_class_embedding,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "snr_gamma": args.snr_gamma,
        "validation_every": args.validation_every,
        "checkpoint_every": args.checkpoint_every,
        "min_images": args.min_images,
        "device": args.device,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # diffusers' schedulers call np.array(tensor) in set_timesteps; torch's Tensor.__array__ takes no copy= (numpy 2 warns)
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword", category=DeprecationWarning,
                                module=r"diffusers\.schedulers\.")
        warnings.showwarning = lambda msg, *a, **k: print(f"synthaug finetune: warning: {msg}")
        out = finetune_lora(args.model, args.images, args.out, resume=args.resume, overwrite=args.overwrite, **settings)
    cfg = json.loads((out / "synthaug.json").read_text())
    tr = cfg["training"]
    window = tr.get("final_loss_window", 20)
    slot = cfg.get("model_class")
    on = ""
    if slot is not None and cfg.get("model_class_name") != cfg.get("class_name"):
        on = f" on the base model's slot {slot}" + (f" (untrained {cfg['model_class_name']!r})" if cfg.get("model_class_name") else " (added)")
    print(
        f"wrote LoRA adapter to {out}: class {cfg.get('class_name')!r}, label {cfg.get('label')}{on}; "
        f"{len(cfg['train_images'])} images, {tr['steps']} steps, "
        f"final loss {tr['final_loss']:.4f} (mean of the last {window} steps, as the bar shows), {tr['wall_time_s']:.0f} s; "
        f"see {out / 'validation.png'} and {out / 'loss.png'}; use it with: synthaug generate --adapter {out}"
    )
    return 0


def add_class_arguments(p: argparse.ArgumentParser) -> None:
    """``--classes`` and ``--classes-from``: your classifier's label space (finetune, cache relabel)."""
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME", help="your classifier's class names in label order, so records carry your whole label space (default: none)")
    p.add_argument("--classes-from", default=None, metavar="DIR", help="take --classes from an ImageFolder root: its class folders, sorted (default: none)")


def classes_from_args(args: argparse.Namespace):
    """Your label space from --classes or --classes-from (an ImageFolder root: its class
    folders in sorted order, as torchvision's ImageFolder numbers them); ``None`` without either."""
    if args.classes and args.classes_from:
        raise ValueError("pass --classes or --classes-from, not both")
    if args.classes_from:
        from pathlib import Path

        root = Path(args.classes_from)
        if not root.is_dir():
            raise FileNotFoundError(f"--classes-from {root} does not exist (no such folder)")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise ValueError(f"--classes-from {root} holds no class folders (expected ROOT/<class>/*.png, as torchvision's ImageFolder)")
        return names
    return list(args.classes) if args.classes else None


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="train a LoRA adapter on 20–50 real images of one class",
        description=__doc__ + " The adapter folder works with `synthaug generate --adapter` and, for Stable-Diffusion "
        "models, with diffusers' pipe.load_lora_weights(OUT).",
    )
    p.add_argument("--model", required=True, help="base model: a diffusers Stable-Diffusion folder or hub id, or builtin:fashion-mnist-ddpm")
    p.add_argument("--images", required=True, help="folder of real training images (PNG/JPEG/...)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--prompt", default=None, help="text condition for Stable-Diffusion models, e.g. 'a photo of sks crack' (default: none; required there)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt stored for generation (default: none)")
    p.add_argument("--class-name", default=None, help="your class's name, carried by every generated record (MixedDataset maps records into your dataset by it); on a class-conditional model that lacks it, the LoRA trains a free conditioning slot (default: the model's rare class, e.g. Shirt)")
    p.add_argument("--label", type=int, default=None, help="the class's index in YOUR classifier's label space (default: its index in --classes/--classes-from; else the model's index for one of its classes; else 0)")
    add_class_arguments(p)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: equal to --rank)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-4 for Stable Diffusion, 1e-3 for the pixel DDPM)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (default: 500)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 1 for Stable Diffusion, 16 for the pixel DDPM)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution in pixels (default: the model's native one: 512 for SD 1.5, 28 for the builtin model)")
    p.add_argument("--target-modules", nargs="+", default=None, help="modules that get LoRA (default: to_q to_k to_v to_out.0; the pixel DDPM adds conv1 conv2)")
    p.add_argument("--no-train-class-embedding", action="store_true", help="pixel DDPM: freeze the class-embedding table (default: train it, so the rare class's slot learns its embedding)")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA init, batches, noise and timesteps (default: 0)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="mixed precision on CUDA (default: no)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="save memory at the cost of compute (default: off)")
    p.add_argument("--snr-gamma", type=float, default=None, help="min-SNR loss weighting gamma, e.g. 5 (default: off)")
    p.add_argument("--validation-every", type=int, default=None, help="write a validation grid every N steps (default: steps/4)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="save a resumable checkpoint every N steps (default: as --validation-every)")
    p.add_argument("--min-images", type=int, default=5, help="refuse fewer training images; warns below 20 (default: 5)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds (default: refuse a non-empty folder)")
    p.set_defaults(func=run)
