"""`gravel` command line: one subcommand per party's step, plus check, bench and demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from gravel.errors import GravelError, InputError

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _add_quant(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization and compilation (where the model does not say)")
    g.add_argument("--in-bits", type=int, default=2, help="input pixel bits (default 2)")
    g.add_argument("--w-bits", type=int, default=4, help="weight bits (default 4)")
    g.add_argument("--a-bits", type=int, default=3, help="activation bits (default 3)")
    g.add_argument("--tlu-bits", type=int, default=5, help="accumulator bits kept for each table lookup (default 5)")
    g.add_argument("--rounding", choices=["auto", "approximate", "exact"], default="auto",
                   help="accumulator rounding before each lookup (auto: exact for sign activations)")
    g.add_argument("--p-error", type=float, default=0.01, help="error probability per table lookup (default 0.01)")
    g.add_argument("--shards", type=int, default=16, help="most shards per layer (default 16)")
    g.add_argument("--calib", type=int, default=500, help="calibration images (default 500)")


def _quant(args):
    from gravel.compiler import QuantConfig

    return QuantConfig(args.in_bits, args.w_bits, args.a_bits, args.tlu_bits, rounding=args.rounding)


def _data(args):
    from gravel.data import load_dataset

    return load_dataset(args.data, root=getattr(args, "data_dir", None), download=getattr(args, "download", False))


def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, default=None if required else "digits",
                   choices=["digits", "mnist", "fashion-mnist"], help="data set")
    p.add_argument("--data-dir", help="directory holding the data set's files")
    p.add_argument("--download", action="store_true", help="download missing files (needs network)")


def cmd_train(args) -> None:
    from gravel.model import Checkpoint, build_model, save_checkpoint, train

    data = _data(args)
    opts = {"hidden": _ints(args.hidden) if args.hidden else None, "in_bits": args.in_bits,
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


def cmd_compile(args) -> None:
    from gravel.compiler import compile_model
    from gravel.harness.common import calib_images

    data = _data(args)
    t = time.perf_counter()
    manifest = compile_model(args.model, calib_images(data, args.calib), args.out, _quant(args),
                             p_error=args.p_error, max_shards=args.shards, name=args.name,
                             overwrite=args.force, show_progress=not args.quiet)
    stats = manifest.data["stats"]
    print(f"compiled {manifest.name} in {time.perf_counter() - t:.1f} s -> {args.out}")
    print(f"  {len(manifest.stages)} stages, {stats['pbs_count']} table lookups, shards per stage "
          f"{[r['shards'] for r in manifest.plan]}")


def cmd_keygen(args) -> None:
    from gravel.client import ClientModel

    client = ClientModel.load(args.artifact)
    t = time.perf_counter()
    keys = client.keygen()
    ek = keys.evaluation_keys()
    keys.save(args.secret)
    _write(args.eval_keys, ek)
    print(f"keys in {time.perf_counter() - t:.2f} s: secret -> {args.secret} (keep it private), "
          f"evaluation keys ({len(ek) / 1e6:.1f} MB) -> {args.eval_keys}")


def _write(path: str, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)


def _load_image(args) -> tuple[np.ndarray, int | None]:
    if args.image:
        path = Path(args.image)
        if path.suffix == ".npy":
            try:
                return np.load(path, allow_pickle=False), None
            except (OSError, ValueError) as exc:
                raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
        try:
            from PIL import Image
        except ImportError as exc:
            raise InputError(f"{path}: reading image files needs Pillow (pip install pillow)") from exc
        try:
            return np.asarray(Image.open(path).convert("L"), dtype=np.uint8), None
        except OSError as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from exc
    data = _data(args)
    if not 0 <= args.index < len(data.x_test):
        raise InputError(f"--index {args.index} outside the test set (0..{len(data.x_test) - 1})")
    return data.x_test[args.index], int(data.y_test[args.index])


def cmd_encrypt(args) -> None:
    from gravel.client import ClientModel, SecretKeys

    client = ClientModel.load(args.artifact)
    keys = SecretKeys.load(args.secret, client)
    image, label = _load_image(args)
    t = time.perf_counter()
    ct = client.encrypt(keys, image)
    _write(args.out, ct)
    extra = f" (label {label})" if label is not None else ""
    print(f"encrypted{extra} in {time.perf_counter() - t:.3f} s: {len(ct)} bytes -> {args.out}")


def cmd_run(args) -> None:
    import os

    if args.workers or args.ray_address or os.environ.get("RAY_ADDRESS"):
        return _run_on_cluster(args)
    from gravel.server import ServerModel

    server = ServerModel.load(args.artifact)
    keys = server.load_evaluation_keys(Path(args.eval_keys).read_bytes())
    value = server.load_input(Path(args.input).read_bytes())
    t = time.perf_counter()
    out, trace = server.run(keys, value)
    elapsed = time.perf_counter() - t
    _write(args.out, server.frame_output(out))
    print(f"ran in {elapsed:.3f} s -> {args.out}")
    for st in trace:
        print(f"  {st.stage}: {st.shards} shards, {st.seconds:.3f} s")


def _run_on_cluster(args) -> None:
    """`gravel run` on Ray: embedded, or the cluster at --ray-address / RAY_ADDRESS."""
    import os

    import ray

    from gravel.cluster import RayExecutor

    executor = RayExecutor(args.artifact, workers=args.workers, address=args.ray_address)
    session = executor.open_session(Path(args.eval_keys).read_bytes())
    out, trace = executor.infer(session, Path(args.input).read_bytes())
    _write(args.out, out)
    print(f"ran on {executor.workers} Ray workers ({len(trace.nodes)} nodes) in {trace.latency_s:.3f} s "
          f"-> {args.out}")
    for stage in dict.fromkeys(r.stage for r in trace.shards):
        rows = [r for r in trace.shards if r.stage == stage]
        print(f"  {stage}: {len(rows)} shards on workers {sorted({r.worker for r in rows})}, "
              f"slowest {max(r.compute_s for r in rows):.3f} s")
    if args.trace:
        Path(args.trace).write_text(json.dumps(trace.to_json(), indent=1))
    sys.stdout.flush()
    executor.shutdown()
    ray.shutdown()
    os._exit(0)  # see _bench_workers: skip teardown of a process that drove Ray and concrete


def cmd_decrypt(args) -> None:
    from gravel.client import ClientModel, SecretKeys

    client = ClientModel.load(args.artifact)
    keys = SecretKeys.load(args.secret, client)
    scores = client.decrypt(keys, Path(args.input).read_bytes())
    print(json.dumps({"prediction": int(np.argmax(scores)), "scores": [round(float(s), 4) for s in scores]}))


def cmd_check(args) -> None:
    from gravel.harness import check

    r = check(args.model, _data(args), samples=args.samples, sim_samples=args.sim_samples,
              fhe_samples=args.fhe_samples, config=_quant(args), calib=args.calib,
              p_error=args.p_error, max_shards=args.shards, progress=not args.quiet)
    if args.json:
        print(json.dumps(r))
        return
    print(f"accuracy on {r['samples']} test images: float {r['accuracy_float']:.4f}, "
          f"quantized {r['accuracy_quantized']:.4f}")
    if r["simulated_samples"]:
        print(f"FHE simulation on {r['simulated_samples']} images: accuracy {r['accuracy_simulated']:.4f}, "
              f"agreement {r['simulation_agreement']:.3f}")
    if "accuracy_encrypted" in r:
        print(f"real encryption on {r['encrypted_samples']} images: accuracy {r['accuracy_encrypted']:.4f}, "
              f"agreement {r['encrypted_agreement']:.3f}, {r['latency_s']:.2f} s each, "
              f"evaluation keys {r['eval_key_bytes'] / 1e6:.1f} MB")
    print(f"table lookups: {r['pbs_count']}; evaluation keys (uncompressed estimate): "
          f"{r['eval_key_bytes_estimate'] / 1e6:.1f} MB")
    print(f"{'stage':8} {'layer':14} {'act':8} {'acc bits':>8} {'tlu bits':>8} {'lookups':>8} {'acc if only this quantized':>27}")
    for row in r["layers"]:
        print(f"{row['stage']:8} {row['layer']:14} {row['activation']:8} {row['accumulator_bits']:>8} "
              f"{row['tlu_bits']:>8} {row['table_lookups']:>8} {row['accuracy_with_only_this_quantized']:>27.4f}")
    for w in r["warnings"]:
        print(f"warning: {w}", file=sys.stderr)


def cmd_bench(args) -> None:
    from gravel.harness import bench

    if args.workers:
        return _bench_workers(args)
    r = bench(args.model, _data(args), samples=args.samples, config=_quant(args), calib=args.calib,
              p_error=args.p_error, max_shards=args.shards, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(r))
        return
    for key, value in r.items():
        print(f"{key:20} {value}")


def _bench_workers(args) -> None:
    import os

    from gravel.harness.scaling import bench_workers, plot_scaling

    workers = _ints(args.workers)
    if not workers or min(workers) < 1:
        raise GravelError(f"--workers {args.workers!r}: give worker counts like 1,2,4")
    r = bench_workers(args.model, _data(args), sorted(workers), samples=args.samples,
                      address=args.ray_address, config=_quant(args), calib=args.calib,
                      p_error=args.p_error, max_shards=args.shards)
    if args.plot:
        plot_scaling(r, args.plot)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "example_trace" or args.trace}))
    else:
        print(f"{r['model']}: {r['pbs_count']} PBS, shards per stage {r['shards']}")
        print(f"{'workers':>8} {'latency s':>10} {'speed-up':>9} {'efficiency':>10} {'req/s':>7} {'overhead':>9}")
        for row in r["scaling"]:
            print(f"{row['workers']:>8} {row['latency_s']:>10.3f} {row['speedup']:>9.2f} "
                  f"{row['parallel_efficiency']:>10.2f} {row['throughput_per_s']:>7.3f} {row['overhead_fraction']:>9.1%}")
        if args.plot:
            print(f"plot -> {args.plot}")
    sys.stdout.flush()
    # A process that drove Ray and ran concrete can abort in interpreter teardown; the work is
    # done and printed, so leave without it.
    import ray

    ray.shutdown()
    os._exit(0)


def cmd_demo(args) -> None:
    """The main job on embedded defaults, through a real server (see gravel.harness.demo)."""
    from gravel.harness.demo import run_demo

    run_demo(_data(args), samples=args.samples, epochs=args.epochs, workdir=args.workdir,
             executor=args.executor, progress=not args.quiet)


def cmd_serve(args) -> None:
    """Run the HTTP service until interrupted."""
    import logging

    from gravel.service import ServiceConfig
    from gravel.service.connections import serve

    config = ServiceConfig()
    config.data_dir = Path(args.data_dir) if args.data_dir else config.data_dir
    config.admin_token = args.admin_token or config.admin_token
    config.executor = args.executor or config.executor
    config.ray_address = args.ray_address or config.ray_address
    config.workers = args.workers
    if args.session_ttl is not None:
        config.session_ttl_s = args.session_ttl
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"gravel serve: http://{args.host}:{args.port}/v1 (data in {config.data_dir}, executor {config.executor})",
          file=sys.stderr, flush=True)
    serve(config, args.host, args.port, log_level="warning" if args.quiet else "info")


def cmd_openapi(args) -> None:
    import json

    from gravel.service import ServiceConfig, create_app

    text = json.dumps(create_app(ServiceConfig()).openapi(), indent=2, sort_keys=True) + "\n"
    if args.out:
        _write(args.out, text.encode())
    else:
        sys.stdout.write(text)


def cmd_deploy(args) -> None:
    from gravel.client import Client

    with Client(args.server, token=args.token, progress=not args.quiet) as client:
        info = client.deploy(args.artifact)
    print(f"deployed {info['name']} ({info['pbs_count']} table lookups, input {info['input_shape']}) "
          f"to {args.server}")


def cmd_predict(args) -> None:
    from gravel.client import Client

    if not args.images:
        raise InputError("name at least one image file (.npy, .png, ...)")
    images = []
    for name in args.images:
        args.image = name
        images.append(_load_image(args)[0])
    with Client(args.server, cache_dir=args.cache_dir, progress=not args.quiet) as client:
        session = client.session(args.model)
        t = time.perf_counter()
        labels = [session.predict(x) for x in images] if len(images) == 1 else session.predict_batch(images)
        elapsed = time.perf_counter() - t
    for name, label in zip(args.images, labels):
        print(f"{name}\t{label}")
    print(f"{len(images)} encrypted predictions in {elapsed:.2f} s (session {session.id})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gravel", description="Private inference on encrypted data (TFHE).")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a quantization-aware (or float) model")
    _add_data(p)
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

    p = sub.add_parser("compile", help="compile a checkpoint or float ONNX model into an artifact")
    p.add_argument("model")
    _add_data(p)
    p.add_argument("--out", required=True, help="artifact directory to write (NAME.gravel)")
    p.add_argument("--name", help="model name (default: file name)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    _add_quant(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("keygen", help="client: generate keys for an artifact")
    p.add_argument("artifact")
    p.add_argument("--secret", required=True, help="file for the SECRET key set")
    p.add_argument("--eval-keys", required=True, help="file for the public evaluation keys")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("encrypt", help="client: quantize and encrypt one image")
    p.add_argument("artifact")
    p.add_argument("--secret", required=True)
    p.add_argument("--image", help=".npy array or image file; or use --data/--index")
    _add_data(p, required=False)
    p.add_argument("--index", type=int, default=0, help="test-set image index (with --data)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("run", help="server: evaluate an encrypted input")
    p.add_argument("artifact")
    p.add_argument("--eval-keys", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="run on this many Ray workers (embedded Ray unless --ray-address)")
    p.add_argument("--ray-address", help="join this Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--trace", help="with Ray: write the inference trace (JSON) here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("decrypt", help="client: decrypt and dequantize a prediction")
    p.add_argument("artifact")
    p.add_argument("--secret", required=True)
    p.add_argument("--input", required=True)
    p.set_defaults(func=cmd_decrypt)

    p = sub.add_parser("check", help="accuracy from float to encrypted, per layer")
    p.add_argument("model")
    _add_data(p)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--sim-samples", type=int, default=100)
    p.add_argument("--fhe-samples", type=int, default=3)
    p.add_argument("--json", action="store_true")
    _add_quant(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="benchmark encrypted inference")
    p.add_argument("model", help="checkpoint, float ONNX file or artifact directory")
    _add_data(p)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workers", help="Ray worker counts to compare, e.g. 1,2,4 (default: single process)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--plot", help="with --workers: write latency/speed-up/timeline plot to this PNG")
    p.add_argument("--trace", action="store_true", help="with --workers --json: include one inference's trace")
    _add_quant(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="run the HTTP service (models, sessions, encrypted inference)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--data-dir", help="store directory (default: GRAVEL_DATA_DIR or ./gravel-data)")
    p.add_argument("--admin-token", help="admin token (default: GRAVEL_ADMIN_TOKEN, else one written to DATA_DIR/admin.token)")
    p.add_argument("--executor", choices=["ray", "local"], help="ray (default; embedded unless --ray-address) or local")
    p.add_argument("--ray-address", help="join this Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--workers", type=int, help="Ray workers per model (default: one per CPU)")
    p.add_argument("--session-ttl", type=float, help="seconds an idle session is kept (default 86400)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("openapi", help="print the service's OpenAPI document")
    p.add_argument("--out", help="write it to this file")
    p.set_defaults(func=cmd_openapi)

    p = sub.add_parser("deploy", help="model owner: upload an artifact to a server (admin token)")
    p.add_argument("artifact")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8470")
    p.add_argument("--token", help="admin token (default: GRAVEL_ADMIN_TOKEN)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("predict", help="client: encrypted prediction of image files through a server")
    p.add_argument("images", nargs="*", help=".npy arrays or image files (grey levels)")
    p.add_argument("--server", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", help="keys and sessions (default: GRAVEL_CACHE_DIR or ~/.cache/gravel)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="the whole private path on embedded defaults")
    _add_data(p, required=False)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workdir")
    p.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="where the server runs inferences (default: embedded Ray)")
    p.set_defaults(func=cmd_demo)
    return parser


def run_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GravelError as exc:
        print(f"gravel {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point. concrete-python's runtime, once used, makes the interpreter exit
    with status 0 from its own teardown; leave with our status before that can happen."""
    import os

    code = run_command(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
