"""Options several command groups share (data set, quantization), and what they build."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_data_options", "add_quant_options", "int_list", "load_data", "quant_config"]


def int_list(text: str) -> list[int]:
    """`128,64` -> [128, 64]: widths and worker counts are given comma-separated."""
    return [int(v) for v in text.split(",") if v]


def add_quant_options(p: argparse.ArgumentParser) -> None:
    from gravel.compiler.quantize import QuantConfig

    d = QuantConfig()  # the defaults have one owner
    g = p.add_argument_group("quantization and compilation (where the model does not say)")
    g.add_argument("--in-bits", type=int, default=d.in_bits, help=f"input bits (default {d.in_bits})")
    g.add_argument("--w-bits", type=int, default=d.w_bits, help=f"weight bits (default {d.w_bits})")
    g.add_argument("--a-bits", type=int, default=d.a_bits, help=f"activation bits (default {d.a_bits})")
    g.add_argument("--tlu-bits", type=int, default=d.tlu_bits,
                   help=f"accumulator bits kept for each table lookup (default {d.tlu_bits})")
    g.add_argument("--rounding", choices=["auto", "approximate", "exact"], default="auto",
                   help="accumulator rounding before each lookup (auto: exact for sign activations)")
    g.add_argument("--p-error", type=float, default=0.01, help="error probability per table lookup (default 0.01)")
    g.add_argument("--shards", type=int, default=16, help="most shards per layer (default 16)")
    g.add_argument("--calib", type=int, default=500, help="calibration images (default 500)")


def quant_config(args: argparse.Namespace) -> Any:
    """The QuantConfig that `add_quant_options` describes (the compiler is imported late)."""
    from gravel.compiler import QuantConfig

    return QuantConfig(args.in_bits, args.w_bits, args.a_bits, args.tlu_bits, rounding=args.rounding)


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, default=None if required else "digits",
                   choices=["digits", "mnist", "fashion-mnist"], help="data set")
    p.add_argument("--data-dir", help="directory holding the data set's files")
    p.add_argument("--download", action="store_true", help="download missing files (needs network)")


def load_data(args: argparse.Namespace) -> Any:
    """The data set that `add_data_options` describes."""
    from gravel.data import load_dataset

    return load_dataset(args.data, root=getattr(args, "data_dir", None), download=getattr(args, "download", False))
