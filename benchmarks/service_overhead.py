"""What the service adds to one small encrypted inference: SDK round trip vs direct execution.

Direct: `ServerModel` in this process on the same ciphertext with already-loaded keys (parse
input, run, frame output). Service: `Session.infer` over HTTP to a real `gravel serve` on
127.0.0.1 (local engine, keys cached after the first call). Measured alternately, N times
each, after a warm-up; the overhead is the difference of the medians. Loopback transfer of
the ~2 kB input and ~160 kB output is part of it.

    .venv/bin/python benchmarks/service_overhead.py [--samples 30]
Prints one JSON object.

`--backend ckks`: the HomomorphicEncryption.org MNIST MLP (784-128-64-10, x^2; trained as
benchmarks/ckks_mlp.py trains it) compiled for CKKS. Direct: `CkksServer.run` in this process on
the same input with the public context already loaded; service: `Session.infer` as above. The
figure of issue 12 is the overhead as a fraction of the direct (server) time, target <= 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--hidden", default="16")
    ap.add_argument("--backend", choices=["concrete", "ckks"], default="concrete")
    ap.add_argument("--epochs", type=int, default=10, help="ckks: training epochs of the MLP")
    args = ap.parse_args()
    if args.backend == "ckks":
        return ckks_overhead(args)

    from gravel.client import Client
    from gravel.data import load_dataset
    from gravel.harness.demo import small_artifact
    from gravel.server import ServerModel
    from gravel.service.process import ServiceProcess

    data = load_dataset("digits")
    work = Path(tempfile.mkdtemp(prefix="gravel-overhead-"))
    manifest = small_artifact(data, work, hidden=tuple(int(h) for h in args.hidden.split(",")),
                              say=lambda s: print(s, file=sys.stderr))
    with ServiceProcess(work / "data", "bench-admin", executor="local") as server:
        with Client(server.url, token="bench-admin", cache_dir=work / "cache") as client:
            client.deploy(manifest.root)
            session = client.session(manifest.name)
            cts = [session.encrypt(x) for x in data.x_test[: args.samples]]
            direct = ServerModel.load(manifest.root)
            keys = direct.load_evaluation_keys(session.keys.evaluation_keys())
            for ct in cts[:3]:  # warm-up: first calls load keys and programs
                session.infer(ct)
                direct.run(keys, direct.load_input(ct))
            service, local, out = [], [], b""
            for ct in cts:
                t0 = time.perf_counter()
                direct.frame_output(direct.run(keys, direct.load_input(ct))[0])
                t1 = time.perf_counter()
                out = session.infer(ct)
                t2 = time.perf_counter()
                local.append(t1 - t0)
                service.append(t2 - t1)
    d, s = statistics.median(local), statistics.median(service)
    print(json.dumps({
        "samples": len(cts),
        "direct_median_s": round(d, 4),
        "sdk_roundtrip_median_s": round(s, 4),
        "overhead_ms": round((s - d) * 1000, 1),
        "input_ct_bytes": len(cts[0]),
        "output_ct_bytes": len(out),
        "pbs_count": manifest.data["stats"]["pbs_count"],
        "cpus": os.cpu_count(),
    }))


def ckks_overhead(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ckks_mlp import train

    from gravel.ckks.artifact import compile_ckks_model, load_server
    from gravel.client import Client
    from gravel.data import load_dataset
    from gravel.harness.common import calib_images, calib_labels
    from gravel.service.process import ServiceProcess

    load_before = os.getloadavg()
    data = load_dataset("mnist")
    work = Path(tempfile.mkdtemp(prefix="gravel-overhead-ckks-"))
    model = train(data, args.epochs)
    manifest = compile_ckks_model(model, calib_images(data, 500), work / "he_mlp.gravel", calib_labels(data, 500),
                                  name="he_mlp")
    print(f"compiled: {manifest.data['backend']['params']}", file=sys.stderr)
    with ServiceProcess(work / "data", "bench-admin", executor="local") as server:
        with Client(server.url, token="bench-admin", cache_dir=work / "cache") as client:
            client.deploy(manifest.root)
            session = client.session(manifest.name)
            cts = [session.encrypt(x) for x in data.x_test[: args.samples]]
            direct = load_server(manifest.root)
            ctx = direct.load_keys(session.keys.evaluation_keys())
            for ct in cts[:3]:  # warm-up: first calls load keys and encode the diagonals
                session.infer(ct)
                direct.run(ctx, ct)
            service, local, out = [], [], b""
            for ct in cts:
                t0 = time.perf_counter()
                direct.run(ctx, ct)
                t1 = time.perf_counter()
                out = session.infer(ct)
                t2 = time.perf_counter()
                local.append(t1 - t0)
                service.append(t2 - t1)
            agree = sum(int(session.model.predict(session.keys, session.infer(ct)) == int(p))
                        for ct, p in zip(cts[:10], direct.program.simulate(data.x_test[:10]).argmax(1)))
    d, s = statistics.median(local), statistics.median(service)
    print(json.dumps({
        "benchmark": "service_overhead", "backend": "ckks", "model": "784-128-64-10 x^2 (HE.org MLP)",
        "samples": len(cts),
        "direct_median_s": round(d, 4),
        "sdk_roundtrip_median_s": round(s, 4),
        "overhead_ms": round((s - d) * 1000, 1),
        "overhead_fraction": round((s - d) / d, 4),
        "target_fraction": 0.10,
        "met": (s - d) / d <= 0.10,
        "agreement_first_10": agree / 10,
        "eval_key_bytes": len(session.keys.evaluation_keys()),
        "input_ct_bytes": len(cts[0]),
        "output_ct_bytes": len(out),
        "params": manifest.data["backend"]["params"],
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
