"""``synthaug generate``: pre-fill a cache with synthetic images (progress bar, clean Ctrl-C).

Seeds: the image stored as sequence number ``q`` is made with per-image seed ``SEED + q`` (the
GenerationWorker's rule), so running the command again on the same cache adds new images and
never repeats a seed, and ``--seed S --count 1`` into a new cache remakes the record whose
``meta["seed"]`` is ``S``. With a fidelity gate (``--gate-classifier``) rejected images use seeds
too, so seeds are reserved in the cache before each batch (:mod:`synthaug.generation.fill`); every
record's seed stays in its ``meta["seed"]``. While it runs it holds the cache's writer lock for its block of 10^9
seeds: a worker or another ``generate`` with seeds in the same block is refused; use
``--seed-offset`` to run several writers at once.

Modes (``--mode``): ``txt2img`` from noise (the default); ``img2img``, SDEdit from the real images
of ``--source-images`` (implied by ``--source-images``); ``translate``, SDEdit from real images of
*other* classes into ``--label``'s class (a folder ``DIR/<class>/*.png``, or files with
``--source-classes``), hard-labelled, or soft-labelled with ``--soft-label-gamma G`` (weight s^G on
the target class and 1 - s^G on the source's, for strength s); ``feedback`` (pixel-DDPM models),
from noise, steered by ``--feedback-classifier`` toward images it finds hard. ``--strength`` takes
one value or a comma-separated set, from which each image draws its own by its seed.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any, Dict, List

from synthaug.cache.store import SyntheticCache
from synthaug.cache.writers import SEED_BLOCK, WriterLock
from synthaug.cli.gate_args import add_gate_arguments, gate_from_args
from synthaug.generation.fill import fill_cache
from synthaug.generation.loading import load_generator
from synthaug.generation.modes import FEEDBACK_OBJECTIVES, MODES
from synthaug.generation.sources import resolve_source
from synthaug.generation.stopping import StopSignal

__all__ = ["register", "add_generator_arguments", "add_seed_arguments", "check_generator_source", "generator_source", "generator_overrides",
           "strength_arg", "HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each flag's help, except where the help already says it or the
    default is ``None``/``False`` (an unset option)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_generator_arguments(p: argparse.ArgumentParser, *, several_adapters: bool = False) -> None:
    """The model and generation flags shared by ``generate`` and ``worker``; ``several_adapters``:
    ``--adapter`` may be repeated as ``NAME=DIR``, one adapter per class (``worker``)."""
    src = p.add_mutually_exclusive_group(required=True)
    if several_adapters:
        src.add_argument("--adapter", metavar="[NAME=]DIR", action="append",
                         help="synthaug adapter directory (from `synthaug finetune`); repeat as --adapter NAME=DIR, one per class "
                         "(e.g. --adapter Shirt=runs/shirt --adapter Coat=runs/coat), all on one base model: one process loads "
                         "the base model once and swaps the adapters per batch, each class's share following demand")
    else:
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
    g.add_argument("--mode", choices=MODES, default=None,
                   help="txt2img (from noise; the default), img2img (SDEdit from --source-images; implied by --source-images), "
                   "translate (SDEdit from --source-images of other classes into --label's class), "
                   "feedback (pixel-DDPM models: from noise, guided toward images --feedback-classifier finds hard)")
    g.add_argument("--source-images", metavar="PATH", nargs="+", default=None,
                   help="img2img: a folder of images, or image files; translate: a folder DIR/<class name or index>/*.png "
                   "(torchvision ImageFolder layout), or image files with --source-classes")
    g.add_argument("--strength", type=strength_arg, default=None, metavar="S[,S...]",
                   help="img2img/translate noise level in (0, 1], or a comma-separated set (e.g. 0.25,0.5,0.75,1) from which "
                   "each image draws its own by its seed (default 0.6)")
    g.add_argument("--source-classes", type=_names, default=None, metavar="C[,C...]",
                   help="translate from image files: the class of each file, in order (names of the model's classes or indices); "
                   "a folder's classes are its subfolders")
    g.add_argument("--soft-label-gamma", type=float, default=None, metavar="G",
                   help="translate: label each image {label: s^G, source class: 1 - s^G} for its strength s (default: the hard label)")
    g.add_argument("--feedback-classifier", metavar="FILE", default=None,
                   help="feedback: a reference classifier file (synthaug.classifier.ReferenceClassifier) trained on real images")
    g.add_argument("--feedback-scale", type=float, default=None, metavar="W",
                   help="feedback: guidance weight >= 0; 0 = plain sampling (default 1.0; the unbounded 'loss' objective needs less, ~0.1-0.3)")
    g.add_argument("--feedback-objective", choices=FEEDBACK_OBJECTIVES, default=None,
                   help="feedback: maximize the classifier's predictive entropy, or its cross-entropy loss for --label's class (default entropy)")
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


def check_generator_source(args: argparse.Namespace) -> None:
    """Check that ``--adapter`` / ``--model`` names something, before any cache is created.

    Raises:
        FileNotFoundError: an ``--adapter`` folder that does not exist (an adapter is never a hub
            id), or a ``--model`` that is no folder, hub id or ``builtin:`` name.
        ValueError: a file, or a folder that is no model or adapter.
    """
    if args.adapter is not None:
        if not Path(args.adapter).expanduser().exists():
            raise FileNotFoundError(f"adapter {args.adapter} does not exist (no such folder)")
        resolve_source(args.adapter, what="adapter")
    else:
        resolve_source(args.model, what="model")


def strength_arg(text: str) -> Any:
    """``--strength``: one number, or a comma-separated set of numbers in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or comma-separated numbers in (0, 1]") from None
    if not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each strength must be in (0, 1]")
    return values[0] if len(values) == 1 else values


def _names(text: str) -> List[str]:
    """``--source-classes``: comma-separated class names or indices."""
    names = [v.strip() for v in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty class name")
    return names


def generator_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """``load_generator`` overrides from the flags that were given.

    Raises:
        ValueError: flags that do not go together (one line naming them and what to do).
    """
    keys = ["label", "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "height", "width", "device", "dtype"]
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "batch_size", None) is not None:
        out["batch_size"] = args.batch_size
    mode = args.mode or ("img2img" if args.source_images is not None else "txt2img")
    if mode != "txt2img":
        out["mode"] = mode
    sources = args.source_images
    if mode in ("img2img", "translate"):
        if sources is None:
            raise ValueError(f"--mode {mode} needs --source-images (a folder or image files)")
        folder = len(sources) == 1 and Path(sources[0]).is_dir()
        out["source_images"] = sources[0] if folder else list(sources)
        if args.strength is not None:
            out["strength"] = args.strength
    else:
        for flag, value in (("--source-images", sources), ("--strength", args.strength)):
            if value is not None:
                raise ValueError(f"{flag} applies to --mode img2img or translate, not {mode}")
    if mode == "translate":
        if args.source_classes is not None:
            if folder:
                raise ValueError(f"--source-classes is for a list of image files; the classes of folder {sources[0]} are its subfolders")
            out["source_classes"] = args.source_classes
        elif not folder:
            raise ValueError("--mode translate from image files needs --source-classes (one class per file, comma-separated)")
        if args.soft_label_gamma is not None:
            out["soft_label_gamma"] = args.soft_label_gamma
    else:
        for flag, value in (("--source-classes", args.source_classes), ("--soft-label-gamma", args.soft_label_gamma)):
            if value is not None:
                raise ValueError(f"{flag} applies to --mode translate only")
    feedback = {"feedback_classifier": args.feedback_classifier, "feedback_scale": args.feedback_scale, "feedback_objective": args.feedback_objective}
    if mode == "feedback":
        if args.feedback_classifier is None:
            raise ValueError("--mode feedback needs --feedback-classifier FILE (a reference classifier trained on real images)")
        out.update({k: v for k, v in feedback.items() if v is not None})
    else:
        stray = ["--" + k.replace("_", "-") for k, v in feedback.items() if v is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} applies to --mode feedback only")
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
    overrides = generator_overrides(args)  # flags that do not go together fail before the cache is touched
    check_generator_source(args)  # so does a missing --adapter / --model
    gate = gate_from_args(args)
    seed = args.seed + args.seed_offset * SEED_BLOCK
    # An existing cache: take its writer lock first (one writer per seed block), so a busy cache is
    # refused at once, not after the model loads. A new one: load the model first, so a model that
    # fails to load leaves no empty cache behind.
    cache = lock = None
    if (Path(args.cache) / "data.mdb").is_file():
        cache = SyntheticCache(args.cache, encoding=args.encoding)
        lock = WriterLock(cache.path, seed, kind="synthaug generate").acquire()
    try:
        t_load = time.perf_counter()
        generator = load_generator(source, **overrides)
        t_load = time.perf_counter() - t_load
        if cache is None:
            cache = SyntheticCache(args.cache, encoding=args.encoding)
            lock = WriterLock(cache.path, seed, kind="synthaug generate").acquire()
        return _generate(args, cache, source, seed, generator, t_load, gate)
    finally:
        if lock is not None:
            lock.release()


def _generate(args: argparse.Namespace, cache, source: str, seed: int, generator, t_load: float, gate) -> int:
    if getattr(generator, "label_names", None):
        cache.adopt_label_names(generator.label_names)  # refuses a cache whose names disagree
    stop = StopSignal()
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop.install()  # Ctrl-C / SIGTERM: finish the append in progress, then stop
    try:
        result = fill_cache(generator, cache, args.count, seed=seed, batch_size=args.batch_size, gate=gate, stop=stop, progress=True)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    seqs = result.seqs
    where = f"seq {seqs[0]}..{seqs[-1]}, seeds {result.seeds[0]}..{result.seeds[-1]}" if seqs else "nothing"
    if gate is not None:
        where += f"; the gate passed {result.accepted} of {result.generated} generated ({result.acceptance_rate or 0:.0%})"
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
    add_gate_arguments(p)
    p.add_argument("--encoding", default=None, choices=["raw", "png", "jpeg", "webp"], help="image encoding of a new cache (default: the cache's own, raw for a new one)")
    p.set_defaults(func=cmd_generate)
