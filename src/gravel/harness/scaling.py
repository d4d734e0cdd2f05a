"""`gravel bench --workers 1,2,...`: latency, throughput and parallel efficiency on Ray."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from gravel.client import ClientModel
from gravel.cluster import InferenceTrace, RayExecutor
from gravel.compiler import QuantConfig, load_graph
from gravel.data import Dataset
from gravel.harness.common import ensure_artifact

__all__ = ["bench_workers", "critical_path", "format_scaling", "plot_scaling", "plot_timeline"]


def critical_path(trace: InferenceTrace) -> tuple[float, int]:
    """Sum over stages of the busiest worker's compute, and of its shard count."""
    seconds, rounds = 0.0, 0
    for stage in dict.fromkeys(r.stage for r in trace.shards):
        per_worker: dict[int, list[float]] = {}
        for r in trace.shards:
            if r.stage == stage:
                per_worker.setdefault(r.worker, []).append(r.compute_s)
        busiest = max(per_worker.values(), key=sum)
        seconds += sum(busiest)
        rounds += max(len(v) for v in per_worker.values())
    return seconds, rounds


def bench_workers(
    model: str | Path,
    data: Dataset,
    workers: list[int],
    samples: int = 5,
    address: str | None = None,
    config: QuantConfig = QuantConfig(),
    **compile_kwargs: Any,
) -> dict[str, Any]:
    import ray

    manifest, tmp = ensure_artifact(model, data, config=config, **compile_kwargs)
    try:
        client = ClientModel(manifest)
        graph = load_graph(manifest)
        keys = client.keygen()
        eval_keys = keys.evaluation_keys()
        x = data.x_test[:samples]
        clear = graph.predict(x)
        cts = [client.encrypt(keys, image) for image in x]
        baseline = single_process_latency(manifest, keys, eval_keys, cts)
        if not ray.is_initialized() and not address:
            ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
        rows, example = [], None
        for w in workers:
            executor = RayExecutor(manifest.root, workers=w, address=address)
            try:
                session = executor.open_session(eval_keys)
                executor.infer(session, cts[0])  # every worker now holds the keys
                lat, preds, over, per_shard, queue = [], [], [], [], []
                for ct in cts:
                    out, trace = executor.infer(session, ct)
                    lat.append(trace.latency_s)
                    preds.append(client.predict(keys, out))
                    crit, rounds = critical_path(trace)
                    over.append((trace.latency_s - crit) / crit)
                    per_shard.append((trace.latency_s - crit) / rounds)
                    queue.extend(r.queue_s for r in trace.shards)
                    example = trace
                t = time.perf_counter()  # a queue of requests: the executor picks how to run it
                _, _, throughput_mode = executor.infer_many(session, cts * 2)
                wall = time.perf_counter() - t
                mode = executor.mode
            finally:
                executor.shutdown()
            rows.append({
                "workers": w,
                "mode": mode,
                "latency_s": statistics.median(lat),
                "throughput_per_s": 2 * len(cts) / wall,
                "throughput_mode": throughput_mode,
                "overhead_fraction": statistics.median(over),
                "overhead_per_shard_ms": 1000 * statistics.median(per_shard),
                "queue_wait_median_ms": 1000 * statistics.median(queue),
                "agreement": float((np.asarray(preds) == clear).mean()),
            })
        for row in rows:  # against the fastest single process on the same cores, not one worker
            row["speedup"] = baseline["latency_s"] / row["latency_s"]
            row["parallel_efficiency"] = row["speedup"] / row["workers"]
        return {
            "baseline": baseline,
            "model": manifest.name,
            "dataset": data.name,
            "samples": len(cts),
            "pbs_count": manifest.data["stats"]["pbs_count"],
            "shards": [r["shards"] for r in manifest.plan],
            "plan": manifest.plan,
            "eval_key_bytes": len(eval_keys),
            "scaling": rows,
            "example_trace": example.to_json() if example else None,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def single_process_latency(manifest: Any, keys: Any, eval_keys: bytes, cts: list[bytes]) -> dict[str, Any]:
    """The fastest path in this process: the artifact's fused function where it has one (one
    backend call), on every core this process may use; medians over `cts` after one warm run."""
    import os

    from gravel.server import ServerModel

    server = ServerModel(manifest)
    server_keys = server.load_evaluation_keys(eval_keys)
    values = [server.load_input(ct) for ct in cts]
    server.run(server_keys, values[0])
    lat = []
    for v in values:
        t = time.perf_counter()
        server.run(server_keys, v)
        lat.append(time.perf_counter() - t)
    return {"path": "fused, one process" if server.fused else "stage by stage, one process",
            "cores": len(os.sched_getaffinity(0)), "latency_s": statistics.median(lat)}


def plot_timeline(ax: Any, trace: dict[str, Any], title: str) -> None:
    """One inference's shards as bars per worker, coloured by stage (an InferenceTrace's JSON)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min(s["submitted"] for s in trace["shards"])
    stages = list(dict.fromkeys(s["stage"] for s in trace["shards"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for s in trace["shards"]:
        c = colors[stages.index(s["stage"]) % len(colors)]
        ax.barh(s["worker"], s["finished"] - s["started"], left=s["started"] - t0, color=c, edgecolor="k")
    ax.legend(handles=[Patch(color=colors[i % len(colors)], label=st) for i, st in enumerate(stages)])
    ax.set_yticks(sorted({s["worker"] for s in trace["shards"]}))
    ax.set(xlabel="seconds", ylabel="worker", title=title)


def plot_scaling(result: dict[str, Any], path: str | Path) -> None:
    """Latency and speed-up against workers (with the ideal line), and one inference's timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["scaling"]
    w = [r["workers"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax1.plot(w, [r["latency_s"] for r in rows], "o-", label="measured")
    ax1.axhline(result["baseline"]["latency_s"], color="gray", ls=":", label="one process, all cores")
    ax1.set(xlabel="workers", ylabel="median latency (s)", title="Latency")
    ax1.legend()
    ax2.plot(w, [r["speedup"] for r in rows], "o-", label="measured")
    ax2.axhline(1.0, color="gray", ls=":", label="one process, all cores")
    ax2.set(xlabel="workers", ylabel="speed-up", title="Speed-up")
    ax2.legend()
    if result["example_trace"]:
        plot_timeline(ax3, result["example_trace"], f"One inference ({rows[-1]['workers']} workers)")
    fig.suptitle(f"{result['model']}: {result['pbs_count']} PBS, shards {result['shards']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_scaling(result: dict[str, Any]) -> str:
    """The table `gravel bench --workers` prints for a `bench_workers` result."""
    r = result
    b = r["baseline"]
    lines = [f"{r['model']}: {r['pbs_count']} PBS, shards per stage {r['shards']}",
             f"baseline: {b['path']} on {b['cores']} cores, {b['latency_s']:.3f} s; speed-ups are against it",
             f"{'workers':>8} {'mode':>8} {'latency s':>10} {'speed-up':>9} {'efficiency':>10} {'req/s':>7} {'overhead':>9}"]
    for row in r["scaling"]:
        lines.append(f"{row['workers']:>8} {row['mode']:>8} {row['latency_s']:>10.3f} {row['speedup']:>9.2f} "
                     f"{row['parallel_efficiency']:>10.2f} {row['throughput_per_s']:>7.3f} "
                     f"{row['overhead_fraction']:>9.1%}")
    return "\n".join(lines)
