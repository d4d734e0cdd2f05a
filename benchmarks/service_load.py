"""16 concurrent clients, 5 encrypted predictions each, through a real `gravel serve`.

Compares the server's wall time for the 80 inferences with the pure compute time of the same
80 inferences run directly (gravel.server.ServerModel in this process, one after another, as
the local engine runs them), and checks every decrypted prediction against the clear quantized
model. Clients encrypt before the clock starts and decrypt after it stops, so that on a small
machine the clients' own work does not compete with the server's.

    .venv/bin/python benchmarks/service_load.py [--clients 16] [--per-client 5] [--executor local]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=5)
    ap.add_argument("--hidden", default="32", help="hidden widths of the digits MLP")
    ap.add_argument("--p-error", type=float, default=1e-4,
                    help="per-lookup error probability (the compiler's default 0.01 flips ~1 in 40 predictions)")
    ap.add_argument("--rounding", default="exact",
                    help="accumulator rounding; approximate rounding flips ~1 in 80 predictions vs the clear model")
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    args = ap.parse_args()

    from gravel.client import Client
    from gravel.compiler import load_graph
    from gravel.data import load_dataset
    from gravel.harness.demo import small_artifact
    from gravel.server import ServerModel
    from gravel.service.process import ServiceProcess

    data = load_dataset("digits")
    work = Path(tempfile.mkdtemp(prefix="gravel-load-"))
    manifest = small_artifact(data, work, hidden=tuple(int(h) for h in args.hidden.split(",")),
                              p_error=args.p_error, rounding=args.rounding, say=lambda s: print(s, file=sys.stderr))
    n = args.clients * args.per_client
    x = data.x_test[:n]
    clear = [int(p) for p in load_graph(manifest).predict(x)]

    with ServiceProcess(work / "data", "bench-admin", executor=args.executor) as server:
        clients = [Client(server.url, token="bench-admin", cache_dir=work / f"cache{i}") for i in range(args.clients)]
        clients[0].deploy(manifest.root)
        t = time.perf_counter()
        sessions = [c.session(manifest.name) for c in clients]
        setup_s = time.perf_counter() - t
        cts = [[sessions[c].encrypt(x[c * args.per_client + k]) for k in range(args.per_client)]
               for c in range(args.clients)]

        # Pure compute: the same 80 inferences, directly, in this process (server idle meanwhile).
        direct = ServerModel.load(manifest.root)
        keys = [direct.load_evaluation_keys(s.keys.evaluation_keys()) for s in sessions]
        compute = []
        for c in range(args.clients):
            for ct in cts[c]:
                t0 = time.perf_counter()
                direct.frame_output(direct.run(keys[c], direct.load_input(ct))[0])
                compute.append(time.perf_counter() - t0)
        del direct, keys

        outs: list[list[bytes]] = [[] for _ in range(args.clients)]
        errors: list[str] = []

        def client_loop(c: int) -> None:
            try:
                for ct in cts[c]:
                    outs[c].append(sessions[c].infer(ct))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"client {c}: {exc}")

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        metrics = httpx.get(server.url + "/metrics").text
        preds = [int(sessions[c].model.predict(sessions[c].keys, o)) for c in range(args.clients) for o in outs[c]]
        for cl in clients:
            cl.close()

    served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("gravel_inference_seconds_sum"))
    correct = sum(int(p == e) for p, e in zip(preds, clear))
    result = {
        "clients": args.clients,
        "predictions": len(preds),
        "correct": correct,
        "errors": len(errors),
        "accuracy_vs_labels": round(sum(int(p == int(y)) for p, y in zip(preds, data.y_test[:n])) / n, 4),
        "service_wall_s": round(wall, 2),
        "pure_compute_s": round(sum(compute), 2),
        "wall_over_compute": round(wall / sum(compute), 3),
        "server_engine_s": round(served, 2),
        "median_inference_s": round(statistics.median(compute), 3),
        "session_setup_s_total": round(setup_s, 1),
        "executor": args.executor,
        "p_error": args.p_error,
        "rounding": args.rounding,
        "pbs_count": manifest.data["stats"]["pbs_count"],
        "cpus": os.cpu_count(),
    }
    if errors:
        result["first_error"] = errors[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
