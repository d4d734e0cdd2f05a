#!/usr/bin/env python3
"""Issue 9's machine model: S(W) for W "machines" of k pinned cores, against one process.

A machine is k cores of this host: the single-process baseline runs under `taskset` on cores
0..k-1 with k backend threads; each Ray worker is pinned to its own k cores (RayExecutor's
`pin_cores`). In one run, on the same encrypted inputs:

    single_k_s      the fastest single process (the fused program) on k cores
    single_all_s    the same on every core of the host
    W workers       median latency of one inference on W workers of k cores each
    S(W)            single_k_s / latency(W)
    vs_all_cores    single_all_s / latency(W): is W*k cores of workers worth one process on them?

Writes JSON (with one inference's per-worker timeline, for `scale_model.py`), and a plot.

    python benchmarks/scaling.py MODEL_OR_ARTIFACT --data mnist --k 1 --workers 1,2 \\
        [--samples 5] [--json runs/scaling.json] [--plot runs/scaling.png]

A model (checkpoint or ONNX file) is compiled with as many shards per stage as the largest W.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gravel.tuning import backend_env

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from gravel.server import ServerModel
art, warm, keys_file, *ct_files = sys.argv[1:]
s = ServerModel.load(art)
keys = s.load_evaluation_keys(Path(keys_file).read_bytes())
values = [s.load_input(Path(f).read_bytes()) for f in ct_files]
if warm == "1":
    s.run(keys, values[0])
lat = []
for v in values:
    t = time.perf_counter(); s.run(keys, v); lat.append(time.perf_counter() - t)
print(json.dumps({"latencies": lat, "fused": bool(s.fused)}))
"""


def single_process(artifact: Path, keys_file: Path, ct_files: list[Path], cores: list[int], warm: bool = True) -> dict:
    """Median latency of the in-process path pinned to `cores`, with as many backend threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cores)), **backend_env()}  # as Ray workers get
    cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-c", CHILD, str(artifact),
           "1" if warm else "0", str(keys_file), *map(str, ct_files)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"cores": cores, "latency_s": statistics.median(r["latencies"]), "latencies": r["latencies"],
            "path": "fused" if r["fused"] else "stage by stage"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="checkpoint, ONNX file or artifact directory")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--k", type=int, default=1, help="cores per machine (default 1)")
    ap.add_argument("--workers", default="1,2", help="worker counts W (default 1,2)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--plot", help="PNG: S(W) and one inference's per-worker timeline")
    ap.add_argument("--ray-address", help="join this Ray cluster (e.g. nodes in network namespaces, "
                                          "benchmarks/netns_delay.sh) instead of starting one")
    ap.add_argument("--label", default="", help="a note stored in the JSON (e.g. the added delay)")
    ap.add_argument("--no-warm", action="store_true",
                    help="skip the untimed first inference of each path (for models that take minutes)")
    args = ap.parse_args(argv)

    import numpy as np
    import ray

    from gravel.client import ClientModel
    from gravel.cluster import RayExecutor
    from gravel.compiler import load_graph
    from gravel.data import load_dataset
    from gravel.harness.common import ensure_artifact

    cpus = os.cpu_count() or 1
    workers = sorted({int(w) for w in args.workers.split(",")})
    if max(workers) * args.k > cpus:
        raise SystemExit(f"{max(workers)} machines of {args.k} cores need {max(workers) * args.k}; this host has {cpus}")
    data = load_dataset(args.data)
    load_before = os.getloadavg()
    manifest, tmp = ensure_artifact(args.model, data, max_shards=max(workers))
    client = ClientModel(manifest)
    keys = client.keygen()
    eval_keys = keys.evaluation_keys()
    x = data.x_test[: args.samples]
    clear = load_graph(manifest).predict(x)
    cts = [client.encrypt(keys, image) for image in x]
    with tempfile.TemporaryDirectory() as d:
        keys_file = Path(d) / "keys"
        keys_file.write_bytes(eval_keys)
        ct_files = []
        for i, ct in enumerate(cts):
            ct_files.append(Path(d) / f"ct{i}")
            ct_files[-1].write_bytes(ct)
        warm = not args.no_warm
        single_k = single_process(manifest.root, keys_file, ct_files, list(range(args.k)), warm)
        single_all = single_process(manifest.root, keys_file, ct_files, list(range(cpus)), warm)

    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    rows, traces = [], {}
    for w in workers:
        ex = RayExecutor(manifest.root, workers=w, threads_per_worker=args.k, pin_cores=True)
        try:
            session = ex.open_session(eval_keys)
            if warm:
                ex.infer(session, cts[0])  # every worker now holds the keys
            lat, preds = [], []
            for ct in cts:
                out, trace = ex.infer(session, ct)
                lat.append(trace.latency_s)
                preds.append(client.predict(keys, out))
            traces[w] = trace.to_json()
            rows.append({"workers": w, "cores_each": args.k, "mode": ex.mode,
                         "pinned": [info["cores"] for info in ex.worker_stats()],
                         "latency_s": statistics.median(lat), "latencies": lat,
                         "S": single_k["latency_s"] / statistics.median(lat),
                         "vs_all_cores": single_all["latency_s"] / statistics.median(lat),
                         "agreement": float((np.asarray(preds) == clear).mean())})
        finally:
            ex.shutdown()
        time.sleep(1.0)
    result = {
        "label": args.label, "cluster": args.ray_address or "embedded", "warm_run": not args.no_warm,
        "model": manifest.name, "dataset": data.name, "samples": len(cts), "k": args.k,
        "shards": [r["shards"] for r in manifest.plan], "pbs_count": manifest.data["stats"]["pbs_count"],
        "plan": manifest.plan,
        "eval_key_bytes": len(eval_keys), "backend_env": backend_env(),
        "machine": {"cpus": cpus, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "time": time.strftime("%Y-%m-%d %H:%M")},
        "single_k": single_k, "single_all": single_all, "rows": rows,
        "example_trace": traces[max(workers)],
    }
    line = json.dumps(result)
    print(json.dumps({k: v for k, v in result.items() if k != "example_trace"}))
    if args.json:
        Path(args.json).write_text(line)
    if args.plot:
        plot(result, args.plot)
    sys.stdout.flush()
    if tmp is not None:
        tmp.cleanup()
    ray.shutdown()
    os._exit(0)  # skip the teardown of a process that drove Ray and concrete


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gravel.harness.scaling import plot_timeline

    rows = result["rows"]
    w = [r["workers"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(w, [r["S"] for r in rows], "o-", label=f"S(W): vs one process on {result['k']} cores")
    ax1.plot(w, [r["vs_all_cores"] for r in rows], "s-", label="vs one process on all cores")
    ax1.plot(w, w, "--", color="gray", label="ideal")
    ax1.set(xlabel=f"workers of {result['k']} cores", ylabel="speed-up", title=result["model"])
    ax1.legend()
    plot_timeline(ax2, result["example_trace"], f"one inference on {rows[-1]['workers']} workers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
