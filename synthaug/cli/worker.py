"""``synthaug worker``: keep a cache topped up from the foreground, e.g. on another GPU.

Runs the GenerationWorker loop in this process: while fewer than ``--min-fresh`` records are
unconsumed, generate and append; never hold more than ``--max-items`` records, evicting only
records every consumer has passed and released (else wait, state "paused"); heartbeat in the
cache. One writer per block of 10^9 seeds: a second worker on the same cache needs
``--seed-offset``. Ctrl-C (exit status 130) or SIGTERM (exit status 0) stop it after the
transaction in progress. The model and generation flags, ``--mode`` (txt2img, img2img, translate,
feedback) and its settings included, are those of ``synthaug generate``.

Several rare classes in one process: ``--adapter Shirt=DIR --adapter Coat=DIR ...`` (adapters on
one base model). The base model is loaded once and each class's LoRA adapter is swapped in for its
batches; each class keeps a share of ``--min-fresh`` that follows the consumers' per-class ratios
(from their cursors), else ``--demand Shirt=2 --demand Coat=1``, else equal shares. Generation
flags apply to every class; each adapter gives its own prompt and label.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Dict, List, Optional

from synthaug.adapter import is_adapter_dir, read_adapter_config
from synthaug.cache.store import SyntheticCache
from synthaug.cache.writers import SEED_BLOCK
from synthaug.cli.gate_args import add_gate_arguments, gate_from_args
from synthaug.cli.generate import (HelpFormatter, add_generator_arguments, add_seed_arguments, check_generator_source, generator_overrides,
                                   generator_source)
from synthaug.generation.multi import check_class_specs
from synthaug.generation.sources import resolve_source
from synthaug.generation.worker import run_worker

__all__ = ["register"]


def _named(value: str) -> bool:
    """Whether an ``--adapter`` value is ``NAME=DIR`` (not a folder whose name holds ``=``)."""
    name, eq, folder = value.partition("=")
    return bool(eq and name and folder) and not Path(value).expanduser().exists()


def adapter_classes(values: Optional[List[str]]) -> Optional[Dict[str, str]]:
    """``{class name: adapter folder}`` from the ``--adapter`` values, or ``None`` for one plain
    ``--adapter DIR`` (one class, as before). A plain ``DIR`` among several is named by its
    adapter's ``class_name`` (else the folder's name).

    Raises:
        ValueError: a class named twice.
        FileNotFoundError: an adapter folder that does not exist.
    """
    if not values or (len(values) == 1 and not _named(values[0])):
        return None
    out: Dict[str, str] = {}
    for value in values:
        if _named(value):
            name, _, folder = value.partition("=")
        else:
            folder = value
            name = str(read_adapter_config(folder).get("class_name") or "") if is_adapter_dir(folder) else ""
            name = name or Path(folder).name
        if not Path(folder).expanduser().exists():
            raise FileNotFoundError(f"adapter {folder} of class {name!r} does not exist (no such folder)")
        if name in out:
            raise ValueError(f"class {name!r} is given twice (--adapter {name}={out[name]} and {value}); one adapter per class")
        out[name] = folder
    return out


def demand_arg(text: str):
    """``--demand NAME=W``: a class's weight, a number >= 0."""
    name, eq, weight = text.partition("=")
    try:
        value = float(weight)
    except ValueError:
        value = -1.0
    if not (eq and name) or not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=WEIGHT with a weight >= 0 (e.g. Shirt=2)")
    return name, value


def _class_specs(args: argparse.Namespace, classes: Dict[str, str]) -> Dict[str, dict]:
    """Each class's generator spec: its adapter with the generation flags (the same for all)."""
    for flag, value in (("--label", args.label), ("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                        ("--source-images", args.source_images)):
        if value is not None:
            raise ValueError(f"{flag} would apply to every class of {', '.join(classes)}; with several adapters each one gives its own "
                             "(its synthaug.json), so leave it out or run one worker per class")
    overrides = generator_overrides(args)
    for name, folder in classes.items():
        resolve_source(folder, what=f"adapter of class {name!r}")
    return {name: {"source": folder, "overrides": dict(overrides)} for name, folder in classes.items()}


def cmd_worker(args: argparse.Namespace) -> int:
    from synthaug.progress import progress_bar

    classes = adapter_classes(args.adapter)
    demand = dict(args.demand) if args.demand else None
    if classes is None:
        if args.adapter is not None:
            args.adapter = args.adapter[0]
        if demand is not None:
            raise ValueError("--demand weighs the classes of several --adapter NAME=DIR; this worker serves one")
        source = generator_source(args)
        generator = {"source": source, "overrides": generator_overrides(args)}
        check_generator_source(args)  # a missing --adapter / --model is named before the cache is created
    else:
        source = ", ".join(f"{name}={folder}" for name, folder in classes.items())
        generator = _class_specs(args, classes)
    gate = gate_from_args(args)
    if classes is not None:
        # adapters on different base models (and the like) are refused before the cache is created
        check_class_specs(generator)
    cache = SyntheticCache(args.cache)
    bar = progress_bar(desc="worker", unit="img", dynamic_ncols=True)

    def progress(info) -> None:
        bar.update(info["generated"] - bar.n)
        gated = f", gate passed {info['acceptance_rate']:.0%}" if info.get("acceptance_rate") is not None and gate is not None else ""
        per_class = ""
        if info.get("classes"):
            per_class = ", " + " ".join(f"{n} {c['fresh']}/{c['target'] or 0:.0f}" for n, c in info["classes"].items())
        bar.set_postfix_str(f"{info['state']}, fresh {info['fresh']}/{args.min_fresh}{per_class}, stored {info['count']}/{args.max_items}, "
                            f"{info['images_per_s']:.2f} img/s{gated}")

    try:
        info = run_worker(
            cache,
            generator,
            min_fresh=args.min_fresh,
            max_items=args.max_items,
            batch_size=args.batch_size,
            seed=args.seed + args.seed_offset * SEED_BLOCK,
            worker_id=args.worker_id,
            num_threads=args.threads,
            poll_interval=args.poll_interval,
            gate=gate,
            demand=demand,
            progress=progress,
        )
    finally:
        bar.close()
    how = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(info.get("signal"), "request")
    made = ""
    if info.get("classes"):
        made = " (" + ", ".join(f"{n} {c['generated']}" for n, c in info["classes"].items()) + ")"
    print(
        f"synthaug worker: stopped by {how} after generating {info['generated']} images{made} from {source} into {cache.path}; "
        f"cache holds {len(cache)} records, {cache.fresh_count()} fresh, next seed {info['next_seed']}"
    )
    return 130 if info.get("signal") == signal.SIGINT else 0


def register(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="keep a cache topped up with fresh synthetic images (foreground)",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add_generator_arguments(p, several_adapters=True)
    p.add_argument("--cache", required=True, metavar="PATH", help="cache directory (created if missing)")
    p.add_argument("--min-fresh", type=int, required=True, help="keep at least this many records no consumer has been handed "
                   "(several classes: in all, shared among them by demand)")
    p.add_argument("--demand", type=demand_arg, action="append", default=None, metavar="NAME=W",
                   help="several --adapter NAME=DIR: class NAME's weight in the share of --min-fresh while no consumer's cursor "
                   "states per-class ratios (repeat per class; default: equal shares)")
    p.add_argument("--max-items", type=int, required=True, help="never hold more records than this")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call and per append (default: the backend's batch size, else 8)")
    add_seed_arguments(p)
    add_gate_arguments(p)
    p.add_argument("--worker-id", default=None, help="name in the heartbeat (default: host name + random suffix)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between checks while idle or paused")
    p.set_defaults(func=cmd_worker)
