"""What the service adds to one small encrypted inference: SDK round trip vs direct execution.

Direct: `ServerModel` in this process on the same ciphertext with already-loaded keys (parse
input, run, frame output). Service: `Session.infer` over HTTP to a real `gravel serve` on
127.0.0.1 (local engine, keys cached after the first call). Measured alternately, N times
each, after a warm-up; the overhead is the difference of the medians. Loopback transfer of
the ~2 kB input and ~160 kB output is part of it.

    .venv/bin/python benchmarks/service_overhead.py [--samples 30]
Prints one JSON object.
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
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
