"""`gravel demo`: the whole private path on embedded defaults, through a real server."""

from __future__ import annotations

import argparse
from typing import Any

from gravel.cli.options import add_data_options, load_data

__all__ = ["cmd_demo", "register"]


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on embedded defaults, through a real server (see gravel.harness.demo)."""
    from gravel.harness.demo import run_demo

    run_demo(load_data(args), samples=args.samples, epochs=args.epochs, workdir=args.workdir,
             executor=args.executor, progress=not args.quiet)


def register(subparsers: Any) -> None:
    """Add demo to the `gravel` parser."""
    p = subparsers.add_parser("demo", help="the whole private path on embedded defaults")
    add_data_options(p, required=False)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workdir")
    p.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="where the server runs inferences (default: embedded Ray)")
    p.set_defaults(func=cmd_demo)
