"""``synthaug env``: versions and devices, for bug reports."""

from __future__ import annotations

import argparse
import json

from synthaug.environment import collect_env

__all__ = ["register", "collect_env"]


def run(args: argparse.Namespace) -> int:
    info = collect_env()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="print versions and devices (paste into bug reports)", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
