"""``synthaug bench``: run one of the benchmarks (the scripts in ``benchmarks/``), print its table
and write its JSON, with the device and library versions, to ``benchmarks/results/``."""

from __future__ import annotations

import argparse
import importlib
from contextlib import nullcontext

from synthaug.progress import progress_off

__all__ = ["register", "BENCHMARKS"]

BENCHMARKS = {
    "loader": "samples/s of a plain DataLoader vs one mixing the cache at r = 0.1/0.25/0.5",
    "cache": "append and read records/s per encoding, against a bare py-lmdb loop",
    "generate": "generator images/s: the pixel DDPM on CPU; SD-1.5 at 512 px, diffusers' default vs ours, on CUDA",
    "overlap": "real-only vs pre-generate-then-train vs on-the-fly training: wall time, fresh share, waiting",
    "ratio": "per-batch synthetic share: our sampler vs per-sample coin flip vs WeightedRandomSampler, per DDP rank",
    "crash": "SIGKILL a real cache writer --kills times (default 200) while readers read: no committed record lost, none torn",
    "sampler": "pixel DDPM sampler/steps/options: images/s on one CPU thread and class recognition of the generated images",
    "soak": "a worker evicting from a small cache while two trainers with 4 prefetching DataLoader workers each read it: every item checked",
    "adapters": "one worker with 3 LoRA adapters (swapped per batch) vs 3 workers with one each, on the same cores; the cost of one swap",
}


def run(args: argparse.Namespace) -> int:
    import sys

    module = importlib.import_module(f"synthaug.benchmarks.{args.benchmark}")
    # synthaug's --traceback and --no-progress work anywhere on the line, among the benchmark's
    # flags too: taken out of them here (a benchmark's bars all go through synthaug.progress)
    rest = [a for a in args.args if a not in ("--traceback", "--no-progress")]
    args.traceback = args.traceback or "--traceback" in args.args
    no_progress = "--no-progress" in args.args  # before the name: already off (synthaug.cli.main)
    argv0 = sys.argv[0] if sys.argv else ""
    try:
        if sys.argv:
            sys.argv[0] = f"synthaug bench {args.benchmark}"  # the benchmark's parser names itself after it
        with progress_off() if no_progress else nullcontext():
            module.main(rest)
    finally:
        if sys.argv:
            sys.argv[0] = argv0
    return 0


def register(sub) -> None:
    listing = "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    p = sub.add_parser(
        "bench",
        help="run a benchmark (loader, cache, generate, sampler, overlap, ratio, crash, soak, adapters); --quick for a short run",
        description=__doc__ + f" Benchmarks: {listing}. Flags after the name go to the benchmark: "
        "`synthaug bench overlap --help` lists them; every benchmark has --quick (a smoke test, not figures) and --out DIR.",
    )
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its flags, e.g. --quick --out DIR")
    p.set_defaults(func=run)
