"""The ``synthaug`` command: one subcommand per module of this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to the function that runs it. Building the parser imports every subcommand module and,
through them, the synthaug modules they run, but no heavy library: torch, diffusers, peft and
matplotlib are imported only when a command runs (``tests/test_layers.py`` checks it), so
``synthaug --help`` takes a few tenths of a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import List, Optional

from synthaug.errors import SynthaugError
from synthaug.version import __version__

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

# module names under synthaug.cli, in the order --help lists them
SUBCOMMANDS = ["finetune", "generate", "worker", "cache", "bench", "sweep", "quality", "demo", "env"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthaug",
        description="Synthetic rare-class images from LoRA-adapted diffusion models, streamed into training.",
    )
    parser.add_argument("--version", action="version", version=f"synthaug {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"synthaug.cli.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"synthaug {args.command}: interrupted", file=sys.stderr)
        return 130
    except (SynthaugError, ValueError, OSError, KeyError) as exc:
        if args.traceback:
            traceback.print_exc()
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"synthaug {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "lmdb":
            raise
        # a damaged or unreadable LMDB file: say which error LMDB reported, without a traceback
        if args.traceback:
            traceback.print_exc()
        print(f"synthaug {args.command}: error: LMDB {type(exc).__name__}: {exc} (is the cache damaged? try `synthaug cache verify`)", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
