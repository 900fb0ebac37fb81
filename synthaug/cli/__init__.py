"""The ``synthaug`` command: one subcommand per module of this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to the function that runs it. Building the parser imports every subcommand module and,
through them, the synthaug modules they run, but no heavy library: torch, diffusers, peft and
matplotlib are imported only when a command runs (``tests/test_layers.py`` checks it), so
``synthaug --help`` takes a few tenths of a second.

``--traceback`` and ``--no-progress`` are added to every parser and sub-parser, so they work
anywhere on the command line; the sub-parsers' copies default to ``argparse.SUPPRESS`` so that
a flag given before the subcommand is not reset by the sub-parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from contextlib import nullcontext
from typing import List, Optional

from synthaug.errors import SynthaugError
from synthaug.progress import progress_off
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"synthaug.cli.{name}").register(sub)
    _add_common_options(parser, default=False, seen=set())
    return parser


def _add_common_options(parser: argparse.ArgumentParser, default, seen: set) -> None:
    """``--traceback`` and ``--no-progress`` on ``parser`` and, with ``argparse.SUPPRESS`` as the
    default, on every sub-parser below it."""
    if id(parser) in seen:  # an alias
        return
    seen.add(id(parser))
    g = parser.add_argument_group("options accepted anywhere on the command line (before or after the subcommand)")
    g.add_argument("--traceback", action="store_true", default=default, help="show the full traceback of an error (default: a one-line message)")
    g.add_argument("--no-progress", action="store_true", default=default, help="no progress bars, as SYNTHAUG_PROGRESS=off (default: a bar on a "
                   "terminal; a plain line every SYNTHAUG_PROGRESS_INTERVAL=30 s when stderr is redirected)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_common_options(child, argparse.SUPPRESS, seen)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with progress_off() if args.no_progress else nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
