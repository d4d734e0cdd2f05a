"""The server side's commands: run (one inference from files), serve, deploy, openapi."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gravel.cli.files import write_file

__all__ = ["cmd_deploy", "cmd_openapi", "cmd_run", "cmd_serve", "register"]


def cmd_run(args: argparse.Namespace) -> None:
    import os

    from gravel.protocol.manifest import artifact_backend

    if artifact_backend(Path(args.artifact)) == "ckks":
        return _run_ckks(args)
    if args.workers or args.ray_address or os.environ.get("RAY_ADDRESS"):
        return _run_on_cluster(args)
    from gravel.server import ServerModel

    server = ServerModel.load(args.artifact)
    keys = server.load_evaluation_keys(Path(args.eval_keys).read_bytes())
    value = server.load_input(Path(args.input).read_bytes())
    t = time.perf_counter()
    out, trace = server.run(keys, value)
    elapsed = time.perf_counter() - t
    write_file(args.out, server.frame_output(out))
    print(f"ran in {elapsed:.3f} s -> {args.out}")
    for st in trace:
        what = "the whole network in one backend call" if st.stage == "fused" else f"{st.shards} shards"
        print(f"  {st.stage}: {what}, {st.seconds:.3f} s")


def _run_ckks(args: argparse.Namespace) -> None:
    """`gravel run` of a CKKS artifact: one input (one image or a SIMD batch) in this process."""
    from gravel.ckks.artifact import load_server
    from gravel.errors import GravelError

    if args.workers or args.ray_address:
        raise GravelError("--workers and --ray-address are not available for CKKS artifacts yet; "
                          "run without them (one process)")
    server = load_server(args.artifact)
    ctx = server.load_keys(Path(args.eval_keys).read_bytes(), modes=())
    t = time.perf_counter()
    out = server.run(ctx, Path(args.input).read_bytes())
    elapsed = time.perf_counter() - t
    write_file(args.out, out)
    print(f"ran in {elapsed:.3f} s -> {args.out} (CKKS, {len(server.program.stages)} stages in one pass)")


def _run_on_cluster(args: argparse.Namespace) -> None:
    """`gravel run` on Ray: embedded, or the cluster at --ray-address / RAY_ADDRESS."""
    import os

    import ray

    from gravel.cluster import RayExecutor

    executor = RayExecutor(args.artifact, workers=args.workers, address=args.ray_address)
    session = executor.open_session(Path(args.eval_keys).read_bytes())
    out, trace = executor.infer(session, Path(args.input).read_bytes())
    write_file(args.out, out)
    print(f"ran {trace.mode} on {executor.workers} Ray workers ({len(trace.nodes)} nodes) in "
          f"{trace.latency_s:.3f} s -> {args.out}")
    widest = max(row["shards"] for row in executor.manifest.plan)
    if executor.workers > widest:
        print(f"  note: the artifact's plan has at most {widest} shards per stage, so {executor.workers - widest} "
              f"workers had nothing to do; compile with --shards {executor.workers} to use them all")
    for stage in dict.fromkeys(r.stage for r in trace.shards):
        rows = [r for r in trace.shards if r.stage == stage]
        print(f"  {stage}: {len(rows)} shards on workers {sorted({r.worker for r in rows})}, "
              f"slowest {max(r.compute_s for r in rows):.3f} s")
    if args.trace:
        Path(args.trace).write_text(json.dumps(trace.to_json(), indent=1))
    sys.stdout.flush()
    executor.shutdown()
    ray.shutdown()
    os._exit(0)  # as after `gravel bench --workers`: skip teardown of a process that drove Ray and concrete


def cmd_serve(args: argparse.Namespace) -> None:
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


def cmd_openapi(args: argparse.Namespace) -> None:
    from gravel.service import ServiceConfig, create_app

    text = json.dumps(create_app(ServiceConfig()).openapi(), indent=2, sort_keys=True) + "\n"
    if args.out:
        write_file(args.out, text.encode())
    else:
        sys.stdout.write(text)


def cmd_deploy(args: argparse.Namespace) -> None:
    from gravel.client import Client

    with Client(args.server, token=args.token, progress=not args.quiet) as client:
        info = client.deploy(args.artifact)
    what = (f"CKKS, depth {info.get('depth')}" if str(info.get("backend", "")).startswith("ckks")
            else f"{info['pbs_count']} table lookups")
    print(f"deployed {info['name']} ({what}, input {info['input_shape']}) to {args.server}")


def register(subparsers: Any) -> None:
    """Add run, serve, openapi and deploy to the `gravel` parser."""
    p = subparsers.add_parser("run", help="server: evaluate an encrypted input")
    p.add_argument("artifact")
    p.add_argument("--eval-keys", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="run on this many Ray workers (embedded Ray unless --ray-address)")
    p.add_argument("--ray-address", help="join this Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--trace", help="with Ray: write the inference trace (JSON) here")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("serve", help="run the HTTP service (models, sessions, encrypted inference)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--data-dir", help="store directory (default: GRAVEL_DATA_DIR or ./gravel-data)")
    p.add_argument("--admin-token", help="admin token (default: GRAVEL_ADMIN_TOKEN, else one written to DATA_DIR/admin.token)")
    p.add_argument("--executor", choices=["ray", "local"], help="ray (default; embedded unless --ray-address) or local")
    p.add_argument("--ray-address", help="join this Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--workers", type=int, help="Ray workers per model (default: one per CPU; a lone request runs sharded where "
                        "the artifact has shards, overlapping requests run whole inferences side by side)")
    p.add_argument("--session-ttl", type=float, help="seconds an idle session is kept (default 86400)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("openapi", help="print the service's OpenAPI document")
    p.add_argument("--out", help="write it to this file")
    p.set_defaults(func=cmd_openapi)

    p = subparsers.add_parser("deploy", help="model owner: upload an artifact to a server (admin token)")
    p.add_argument("artifact")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8470")
    p.add_argument("--token", help="admin token (default: GRAVEL_ADMIN_TOKEN)")
    p.set_defaults(func=cmd_deploy)
