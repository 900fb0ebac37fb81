"""``synthaug worker``: keep a cache topped up from the foreground, e.g. on another GPU.

Runs the GenerationWorker loop in this process: while fewer than ``--min-fresh`` records are
unconsumed, generate and append; never hold more than ``--max-items`` records, evicting only
records every consumer has passed and released (else wait, state "paused"); heartbeat in the
cache. One writer per block of 10^9 seeds: a second worker on the same cache needs
``--seed-offset``. Ctrl-C (exit status 130) or SIGTERM (exit status 0) stop it after the
transaction in progress. The model and generation flags, ``--mode`` (txt2img, img2img, translate,
feedback) and its settings included, are those of ``synthaug generate``.
"""

from __future__ import annotations

import argparse
import signal

from synthaug.cache.store import SyntheticCache
from synthaug.cache.writers import SEED_BLOCK
from synthaug.cli.gate_args import add_gate_arguments, gate_from_args
from synthaug.cli.generate import (HelpFormatter, add_generator_arguments, add_seed_arguments, check_generator_source, generator_overrides,
                                   generator_source)
from synthaug.generation.worker import run_worker

__all__ = ["register"]


def cmd_worker(args: argparse.Namespace) -> int:
    from synthaug.progress import progress_bar

    source = generator_source(args)
    spec = {"source": source, "overrides": generator_overrides(args)}
    gate = gate_from_args(args)
    check_generator_source(args)  # a missing --adapter / --model is named before the cache is created
    cache = SyntheticCache(args.cache)
    bar = progress_bar(desc="worker", unit="img", dynamic_ncols=True)

    def progress(info) -> None:
        bar.update(info["generated"] - bar.n)
        gated = f", gate passed {info['acceptance_rate']:.0%}" if info.get("acceptance_rate") is not None and gate is not None else ""
        bar.set_postfix_str(f"{info['state']}, fresh {info['fresh']}/{args.min_fresh}, stored {info['count']}/{args.max_items}, "
                            f"{info['images_per_s']:.2f} img/s{gated}")

    try:
        info = run_worker(
            cache,
            spec,
            min_fresh=args.min_fresh,
            max_items=args.max_items,
            batch_size=args.batch_size,
            seed=args.seed + args.seed_offset * SEED_BLOCK,
            worker_id=args.worker_id,
            num_threads=args.threads,
            poll_interval=args.poll_interval,
            gate=gate,
            progress=progress,
        )
    finally:
        bar.close()
    how = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(info.get("signal"), "request")
    print(
        f"synthaug worker: stopped by {how} after generating {info['generated']} images from {source} into {cache.path}; "
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
    add_generator_arguments(p)
    p.add_argument("--cache", required=True, metavar="PATH", help="cache directory (created if missing)")
    p.add_argument("--min-fresh", type=int, required=True, help="keep at least this many records no consumer has been handed")
    p.add_argument("--max-items", type=int, required=True, help="never hold more records than this")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call and per append (default: the backend's batch size, else 8)")
    add_seed_arguments(p)
    add_gate_arguments(p)
    p.add_argument("--worker-id", default=None, help="name in the heartbeat (default: host name + random suffix)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between checks while idle or paused")
    p.set_defaults(func=cmd_worker)
