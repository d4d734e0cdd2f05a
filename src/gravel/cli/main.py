"""`gravel` command line: one subcommand per party's step, plus check, bench and demo.

Each command group lives in its own module with its handlers and a `register(subparsers)`
that declares their options beside them; this module only assembles the parser and runs a
command. A new group is a new module added to COMMAND_GROUPS.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from gravel.cli import client_cmds, demo_cmds, model_cmds, server_cmds, train_encrypted
from gravel.errors import GravelError

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

__all__ = ["COMMAND_GROUPS", "build_parser", "main", "run_command"]

# In the order `gravel --help` lists them: the model owner's, the client's, the server's, the demo,
# then training on encrypted data (CKKS).
COMMAND_GROUPS = (model_cmds, client_cmds, server_cmds, demo_cmds, train_encrypted)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gravel", description="Private inference on encrypted data (TFHE).")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def run_command(argv: list[str] | None = None) -> int:
    """Run one command; a GravelError becomes one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GravelError as exc:
        print(f"gravel {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point. concrete-python's runtime, once used, makes the interpreter exit
    with status 0 from its own teardown; leave with our status before that can happen. Run as
    the `gravel` command (no `argv`), it first restarts itself with huge pages (gravel.tuning)."""
    import os

    if argv is None:
        from gravel.tuning import reexec_with_huge_pages

        reexec_with_huge_pages()
    code = run_command(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
