"""The model owner's commands: train, compile, check, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gravel.cli.options import (
    add_backend_options,
    add_data_options,
    add_finetune_options,
    add_quant_options,
    ckks_options,
    int_list,
    load_data,
    quant_config,
)
from gravel.errors import GravelError

__all__ = ["cmd_bench", "cmd_check", "cmd_compile", "cmd_train", "register"]


def cmd_train(args: argparse.Namespace) -> None:
    from gravel.model import Checkpoint, build_model, save_checkpoint, train

    data = load_data(args)
    opts = {"hidden": int_list(args.hidden) if args.hidden else None, "in_bits": args.in_bits,
            "w_bits": args.w_bits, "a_bits": args.a_bits, "channels": args.channels}
    from gravel.model.archs import DEFAULT_OPTIONS

    if args.arch not in DEFAULT_OPTIONS:
        raise GravelError(f"unknown architecture {args.arch!r}; choose one of {', '.join(DEFAULT_OPTIONS)}")
    opts = {k: v for k, v in opts.items() if v is not None and k in DEFAULT_OPTIONS[args.arch]}
    model, full = build_model(args.arch, data.image_shape, data.num_classes, **opts)
    metrics = train(model, data, epochs=args.epochs, lr=args.lr, progress=not args.quiet)
    save_checkpoint(Checkpoint(args.arch, full, data.image_shape, data.num_classes, data.name, model, metrics), args.out)
    print(f"{args.arch} on {data.name}: train accuracy {metrics['train_accuracy']:.4f}, "
          f"test accuracy {metrics['test_accuracy']:.4f} -> {args.out}")


def cmd_compile(args: argparse.Namespace) -> None:
    if args.backend == "ckks":
        return _compile_ckks(args)
    from gravel.compiler import Finetune, compile_model
    from gravel.harness.common import calib_images, calib_labels

    data = load_data(args)
    t = time.perf_counter()
    tune = None
    if args.finetune:  # the training set, not the calibration one
        tune = Finetune.of(data, args.finetune, args.finetune_samples, progress=not args.quiet)
    manifest = compile_model(args.model, calib_images(data, args.calib), args.out, quant_config(args),
                             calib_y=calib_labels(data, args.calib),
                             p_error=args.p_error, max_shards=args.shards or 1, name=args.name,
                             overwrite=args.force, show_progress=not args.quiet, finetune=tune,
                             tiles=args.tiles)
    stats = manifest.data["stats"]
    print(f"compiled {manifest.name} in {time.perf_counter() - t:.1f} s -> {args.out}")
    print(f"  {len(manifest.stages)} stages, {stats['table_lookups']} table lookups, shards per stage "
          f"{[r['shards'] for r in manifest.plan]}")
    for note in manifest.data["model"].get("notes", []):
        print(f"  note: {note}")


def _compile_ckks(args: argparse.Namespace) -> None:
    from gravel.ckks.artifact import compile_ckks_model
    from gravel.compiler import Finetune
    from gravel.harness.common import calib_images, calib_labels

    data = load_data(args)
    t = time.perf_counter()
    options = ckks_options(args)
    tune = None
    if options.finetune_epochs:  # the training set, not the calibration one
        samples = Finetune.of(data, options.finetune_epochs, args.finetune_samples)
        tune = (samples.x, samples.y)
    manifest = compile_ckks_model(args.model, calib_images(data, args.calib), args.out,
                                  calib_labels(data, args.calib), options, name=args.name,
                                  overwrite=args.force, finetune_data=tune)
    backend, report = manifest.data["backend"], manifest.data["model"]["report"]
    params = backend["params"]
    print(f"compiled {manifest.name} for CKKS in {time.perf_counter() - t:.1f} s -> {args.out}")
    print(f"  depth {backend['depth']}, N={params['poly_modulus_degree']}, moduli {params['coeff_mod_bit_sizes']}, "
          f"{len(manifest.data['packing']['single']['rotation_steps'])} rotation keys for one image, "
          f"{len(manifest.data['packing']['batch']['rotation_steps'])} for a batch")
    for line in report["activations"]:
        print(f"  {line}")
    if "accuracy_float" in report:
        print(f"  calibration accuracy: float {100 * report['accuracy_float']:.1f} %, with the polynomials "
              f"{100 * report['accuracy_polynomial']:.1f} %")
    for note in manifest.data["model"].get("notes", []):
        print(f"  note: {note}")


def cmd_check(args: argparse.Namespace) -> None:
    from gravel.harness import check, format_check

    r = check(args.model, load_data(args), samples=args.samples, sim_samples=args.sim_samples,
              fhe_samples=args.fhe_samples, config=quant_config(args), calib=args.calib,
              p_error=args.p_error, max_shards=args.shards or 1, progress=not args.quiet,
              advice=not args.no_advice, batch=args.batch_size, finetune=args.finetune,
              finetune_samples=args.finetune_samples, tiles=args.tiles)
    if args.json:
        print(json.dumps(r))
    if not r["supported"]:
        if not args.json:
            print(f"{args.model} cannot be compiled:", file=sys.stderr)
            for line in r["problems"]:
                print(f"  {line}", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        return
    print(format_check(r))
    for w in r["warnings"]:
        print(f"note: {w}", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    from gravel.harness import bench, format_bench

    if args.backend == "ckks":
        return _bench_ckks(args)
    if args.batch is not None:
        raise GravelError("--batch is for --backend ckks (TFHE inference is one image at a time)")
    if args.workers:
        return _bench_workers(args)
    r = bench(args.model, load_data(args), samples=args.samples, config=quant_config(args), calib=args.calib,
              p_error=args.p_error, max_shards=args.shards or 1, progress=not args.quiet and not args.json,
              tiles=args.tiles)
    if args.json:
        print(json.dumps(r))
        return
    print(format_bench(r))


def _bench_ckks(args: argparse.Namespace) -> None:
    from gravel.harness.ckks_bench import bench_ckks, format_ckks_bench

    workers = None
    if args.workers:
        counts = int_list(args.workers)
        if len(counts) != 1 or counts[0] < 1:
            raise GravelError(f"--workers {args.workers!r} with --backend ckks: give one worker count "
                              "(a batch's groups, or one image's first matrix, are spread over them)")
        workers = counts[0]
    r = bench_ckks(args.model, load_data(args), samples=args.samples, batch=args.batch, calib=args.calib,
                   options=ckks_options(args), progress=not args.quiet and not args.json,
                   workers=workers, ray_address=args.ray_address)
    print(json.dumps(r) if args.json else format_ckks_bench(r))


def _bench_workers(args: argparse.Namespace) -> None:
    import os

    from gravel.harness.scaling import bench_workers, format_scaling, plot_scaling

    workers = int_list(args.workers)
    if not workers or min(workers) < 1:
        raise GravelError(f"--workers {args.workers!r}: give worker counts like 1,2,4")
    r: dict[str, Any] = bench_workers(args.model, load_data(args), sorted(workers), samples=args.samples,
                                      address=args.ray_address, config=quant_config(args), calib=args.calib,
                                      p_error=args.p_error, max_shards=args.shards or max(workers),
                                      tiles=args.tiles)
    if args.plot:
        plot_scaling(r, args.plot)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "example_trace" or args.trace}))
    else:
        print(format_scaling(r))
        if args.plot:
            print(f"plot -> {args.plot}")
    sys.stdout.flush()
    # A process that drove Ray and ran concrete can abort in interpreter teardown; the work is
    # done and printed, so leave without it.
    import ray

    ray.shutdown()
    os._exit(0)


def register(subparsers: Any) -> None:
    """Add train, compile, check and bench to the `gravel` parser."""
    p = subparsers.add_parser("train", help="train a quantization-aware (or float) model")
    add_data_options(p)
    p.add_argument("--arch", required=True, help="mlp, bnn-mlp, cnn, float-mlp, float-cnn")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", help="hidden widths, e.g. 128,64")
    p.add_argument("--channels", type=int)
    p.add_argument("--in-bits", type=int)
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("compile", help="compile a checkpoint or float ONNX model into an artifact")
    p.add_argument("model")
    add_data_options(p)
    p.add_argument("--out", required=True, help="artifact directory to write (NAME.gravel)")
    p.add_argument("--name", help="model name (default: file name)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    add_quant_options(p)
    add_backend_options(p)
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("check", help="pre-flight: unsupported nodes, lookups, keys, latency, accuracy per layer")
    p.add_argument("model")
    add_data_options(p)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--sim-samples", type=int, default=100)
    p.add_argument("--fhe-samples", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1,
                   help="the batch size to advise a backend for (TFHE or CKKS; default 1)")
    p.add_argument("--no-advice", action="store_true", help="skip the CKKS compile and the backend advice")
    p.add_argument("--json", action="store_true")
    add_quant_options(p)
    add_finetune_options(p)
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser("bench", help="benchmark encrypted inference")
    p.add_argument("model", help="checkpoint, float ONNX file or artifact directory")
    add_data_options(p)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workers", help="Ray worker counts to compare, e.g. 1,2,4 (default: single process)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--plot", help="with --workers: write latency/speed-up/timeline plot to this PNG")
    p.add_argument("--trace", action="store_true", help="with --workers --json: include one inference's trace")
    p.add_argument("--batch", type=int, help="ckks: one batched inference of this many test images")
    add_quant_options(p)
    add_backend_options(p)
    p.set_defaults(func=cmd_bench)
