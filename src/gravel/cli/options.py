"""Options several command groups share (data set, quantization), and what they build."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = [
    "add_backend_options", "add_data_options", "add_quant_options", "ckks_options", "int_list", "load_data",
    "quant_config",
]


def int_list(text: str) -> list[int]:
    """`128,64` -> [128, 64]: widths and worker counts are given comma-separated."""
    return [int(v) for v in text.split(",") if v]


def add_quant_options(p: argparse.ArgumentParser) -> None:
    from gravel.compiler.quantize import QuantConfig

    d = QuantConfig()  # the defaults have one owner
    g = p.add_argument_group("quantization and compilation (where the model does not say)")
    g.add_argument("--in-bits", type=int, help=f"input bits (default: search from {d.in_bits})")
    g.add_argument("--w-bits", type=int, help=f"weight bits (default: search from {d.w_bits})")
    g.add_argument("--a-bits", type=int, help=f"activation bits (default: search from {d.a_bits})")
    g.add_argument("--tlu-bits", type=int,
                   help=f"accumulator bits kept for each table lookup (default: search from {d.tlu_bits}); "
                        "without any of these four, the compiler tries finer settings until the quantized "
                        "model agrees with the float model on the calibration set")
    g.add_argument("--rounding", choices=["auto", "approximate", "exact"], default="auto",
                   help="accumulator rounding before each lookup (auto: exact for sign activations)")
    g.add_argument("--p-error", type=float, default=0.01, help="error probability per table lookup (default 0.01)")
    g.add_argument("--shards", type=int,
                   help="most shards per layer: plan one inference for that many Ray workers (default 1: "
                        "one process runs the whole network in one backend call; `bench --workers` plans "
                        "for its largest worker count)")
    g.add_argument("--tiles", action="store_true",
                   help="with --shards N: split runs of convolutional layers in N row tiles with a halo, "
                        "one call per worker for the whole run and no gather inside it, instead of each "
                        "layer by output channels with a gather after each (worth it where moving a "
                        "layer's output between machines costs more than the halo's extra lookups)")
    g.add_argument("--calib", type=int, default=500, help="calibration images (default 500)")


def quant_config(args: argparse.Namespace) -> Any:
    """The QuantConfig that `add_quant_options` describes (the compiler is imported late)."""
    from gravel.compiler import QuantConfig

    given = {k: getattr(args, k) for k in ("in_bits", "w_bits", "a_bits", "tlu_bits") if getattr(args, k) is not None}
    return QuantConfig(**given, rounding=args.rounding, search=not given)


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, default=None if required else "digits",
                   choices=["digits", "mnist", "fashion-mnist"], help="data set")
    p.add_argument("--data-dir", help="directory holding the data set's files")
    p.add_argument("--download", action="store_true", help="download missing files (needs network)")


def load_data(args: argparse.Namespace) -> Any:
    """The data set that `add_data_options` describes."""
    from gravel.data import load_dataset

    return load_dataset(args.data, root=getattr(args, "data_dir", None), download=getattr(args, "download", False))


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """--backend and the CKKS compiler's settings (the TFHE ones are the quantization options)."""
    from gravel.ckks.compile import CkksOptions

    d = CkksOptions()
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=["concrete", "ckks"], default="concrete",
                   help="concrete: TFHE (exact, any activation); ckks: polynomial activations, "
                        "fast single images and batches (default concrete)")
    g.add_argument("--poly-degree", type=int,
                   help="ckks: degree of the polynomial replacing each non-polynomial activation "
                        "(default: the lowest of 2-4 that costs at most 1 point on the calibration set)")
    g.add_argument("--precision-bits", type=int, default=d.precision_bits,
                   help=f"ckks: bits after the binary point wanted at the output (default {d.precision_bits})")
    add_finetune_options(g)
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"ckks: the batch size the SIMD packing is planned for (default {d.batch_size})")
    g.add_argument("--batch-block", type=int, default=d.batch_block,
                   help="ckks: samples per SIMD group in batched inference (default: the cheapest "
                        "for --batch-size by the compiler's cost model)")


def add_finetune_options(g: Any) -> None:
    """--finetune and --finetune-samples, for `compile` (with the backend options) and `check`
    (which measures the fine-tuned program): one definition for both."""
    from gravel.ckks.compile import CkksOptions

    g.add_argument("--finetune", type=int, default=CkksOptions().finetune_epochs, metavar="EPOCHS",
                   help="fine-tune the compiled program that many epochs on --finetune-samples training "
                        "samples (default off). concrete: the quantized program with its rounding in place, which "
                        "recovers what quantization loses (try 3 with narrower --a-bits/--tlu-bits); ckks: "
                        "where fitted polynomials cost more than 1 point, with the polynomials in place")
    g.add_argument("--finetune-samples", type=int, default=None, metavar="N",
                   help="training samples for --finetune (default 10,000)")


def ckks_options(args: argparse.Namespace) -> Any:
    """The CkksOptions that `add_backend_options` describes."""
    from gravel.ckks.compile import CkksOptions

    return CkksOptions(degree=args.poly_degree, precision_bits=args.precision_bits,
                       batch_size=args.batch_size, batch_block=args.batch_block,
                       finetune_epochs=args.finetune)
