"""``synthaug generate``: pre-fill a cache with synthetic images (progress bar, clean Ctrl-C).

Seeds: the image stored as sequence number ``q`` is made with per-image seed ``SEED + q`` (the
GenerationWorker's rule), so running the command again on the same cache adds new images and
never repeats a seed, and ``--seed S --count 1`` into a new cache remakes the record whose
``meta["seed"]`` is ``S``. While it runs it holds the cache's writer lock for its block of 10^9
seeds: a worker or another ``generate`` with seeds in the same block is refused; use
``--seed-offset`` to run several writers at once.
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any, Dict

from synthaug.cache.store import SyntheticCache
from synthaug.cache.writers import SEED_BLOCK, WriterLock
from synthaug.generation.fill import fill_cache
from synthaug.generation.loading import load_generator
from synthaug.generation.stopping import StopSignal

__all__ = ["register", "add_generator_arguments", "add_seed_arguments", "generator_source", "generator_overrides", "HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each flag's help, except where the help already says it or the
    default is ``None``/``False`` (an unset option)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_generator_arguments(p: argparse.ArgumentParser) -> None:
    """The model and generation flags shared by ``generate`` and ``worker``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", metavar="DIR", help="synthaug adapter directory (from `synthaug finetune`)")
    src.add_argument("--model", metavar="SRC", help="model without adapter: builtin:<name>, a pixel-DDPM or diffusers pipeline folder, or a hub id in the local cache")
    g = p.add_argument_group("generation settings (default: the adapter's synthaug.json, then the backend's defaults)")
    g.add_argument("--label", type=int, default=None, help="class index of the images in the classifier's label space (required without an adapter)")
    g.add_argument("--prompt", default=None, help="text prompt (Stable-Diffusion models)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (Stable-Diffusion models)")
    g.add_argument("--steps", dest="num_inference_steps", type=int, default=None, help="denoising steps")
    g.add_argument("--guidance", dest="guidance_scale", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--scheduler", default=None, help="sampler: ddim, dpm++, euler-a, ... (see synthaug.generation.sd.SCHEDULERS)")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (Stable-Diffusion models)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (Stable-Diffusion models)")
    g.add_argument("--source-images", metavar="DIR", default=None, help="image-to-image (SDEdit) from the images in DIR instead of text-to-image")
    g.add_argument("--strength", type=float, default=None, help="image-to-image noise level in (0, 1] (default 0.6)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="model precision (default: fp16 on cuda, fp32 on cpu)")
    g.add_argument("--compile", action="store_true", help="torch.compile the denoiser (slow first batch, faster after)")


def add_seed_arguments(p: argparse.ArgumentParser) -> None:
    """``--seed`` and ``--seed-offset``, shared by ``generate`` and ``worker``."""
    p.add_argument("--seed", type=int, default=0, help="base seed: the record stored as seq q gets per-image seed SEED + q")
    p.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        metavar="K",
        help="add K × 10^9 to the seed: a second writer on the same cache at the same time needs seeds of another "
        "block of 10^9 (one writer per block; synthaug.cache.writers)",
    )


def generator_source(args: argparse.Namespace) -> str:
    return args.adapter if args.adapter is not None else args.model


def generator_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """``load_generator`` overrides from the flags that were given."""
    keys = ["label", "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "height", "width", "device", "dtype"]
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "batch_size", None) is not None:
        out["batch_size"] = args.batch_size
    if args.source_images is not None:
        out.update(mode="img2img", source_images=args.source_images)
        if args.strength is not None:
            out["strength"] = args.strength
    elif args.strength is not None:
        raise ValueError("--strength applies to image-to-image generation; give --source-images DIR too")
    if args.compile:
        out["compile"] = True
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.seed_offset < 0:
        raise ValueError(f"--seed-offset must be >= 0, got {args.seed_offset}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    source = generator_source(args)
    seed = args.seed + args.seed_offset * SEED_BLOCK
    cache = SyntheticCache(args.cache, encoding=args.encoding)
    lock = WriterLock(cache.path, seed, kind="synthaug generate").acquire()  # one writer per seed block
    try:
        return _generate(args, cache, source, seed)
    finally:
        lock.release()


def _generate(args: argparse.Namespace, cache, source: str, seed: int) -> int:
    t_load = time.perf_counter()
    generator = load_generator(source, **generator_overrides(args))
    t_load = time.perf_counter() - t_load
    if getattr(generator, "label_names", None) and cache.label_names is None:
        cache.set_label_names(generator.label_names)
    stop = StopSignal()
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop.install()  # Ctrl-C / SIGTERM: finish the append in progress, then stop
    try:
        result = fill_cache(generator, cache, args.count, seed=seed, batch_size=args.batch_size, stop=stop, progress=True)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    seqs = result.seqs
    where = f"seq {seqs[0]}..{seqs[-1]}, seeds {seed + seqs[0]}..{seed + seqs[-1]}" if seqs else "nothing"
    verb = "interrupted after writing" if result.interrupted else "wrote"
    print(
        f"synthaug generate: {verb} {result.written} images ({where}) from {source} to {cache.path} "
        f"in {result.seconds:.1f} s ({result.images_per_s:.2f} images/s; model load {t_load:.1f} s); cache holds {len(cache)}"
    )
    return 130 if result.interrupted else 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="pre-fill a cache with synthetic images",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_generator_arguments(p)
    p.add_argument("--cache", required=True, metavar="PATH", help="cache directory (created if missing)")
    p.add_argument("--count", type=int, required=True, help="number of images to add")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call and per append (default: the backend's: 1 for Stable Diffusion on cpu, 8 on cuda; 64 for the pixel DDPM)")
    add_seed_arguments(p)
    p.add_argument("--encoding", default=None, choices=["raw", "png", "jpeg", "webp"], help="image encoding of a new cache (default: the cache's own, raw for a new one)")
    p.set_defaults(func=cmd_generate)
