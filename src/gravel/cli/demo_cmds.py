"""`gravel demo`: the whole private path on embedded defaults, through a real server."""

from __future__ import annotations

import argparse
from typing import Any

from gravel.cli.options import add_data_options, load_data

__all__ = ["cmd_demo", "register"]


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on embedded defaults, through a real server (see gravel.harness.demo)."""
    if args.backend == "ckks":
        from gravel.harness.demo import run_ckks_demo

        run_ckks_demo(load_data(args), samples=args.samples, batch=args.batch, epochs=args.epochs,
                      workdir=args.workdir, executor=args.executor or "local", progress=not args.quiet)
        return
    from gravel.harness.demo import run_demo

    run_demo(load_data(args), samples=args.samples, epochs=args.epochs, workdir=args.workdir,
             executor=args.executor or "ray", progress=not args.quiet)


def register(subparsers: Any) -> None:
    """Add demo to the `gravel` parser."""
    p = subparsers.add_parser("demo", help="the whole private path on embedded defaults")
    add_data_options(p, required=False)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workdir")
    p.add_argument("--backend", choices=["concrete", "ckks"], default="concrete",
                   help="concrete: TFHE, a QAT model (default); ckks: a float MLP with x^2 activations")
    p.add_argument("--batch", type=int, default=100,
                   help="ckks: then this many test images as one SIMD-packed job (0: none)")
    p.add_argument("--executor", choices=["ray", "local"],
                   help="where the server runs inferences (default: embedded Ray for concrete, in-process "
                        "for ckks, which runs in the service process on either)")
    p.set_defaults(func=cmd_demo)
