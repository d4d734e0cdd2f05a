#!/usr/bin/env python3
"""Predict encrypted-inference latency on W workers from one measured trace, and check it.

Input: the JSON of `gravel bench MODEL --workers 1,2 --json --trace` (per-shard compute times,
bytes moved, and the measured per-shard scheduling overhead). Model, per stage s:

    stage_s(W) = ceil(S_s / W) * (c_s + o + bytes_s / bandwidth)      (plan as compiled, W < S_s)
    stage_s(W) = max_shard_s + o + bytes_s / bandwidth               (W >= S_s: the slowest shard)

with S_s shards of mean compute c_s, o the measured overhead per shard. For more workers than
shards, the stage would have to be cut finer; with a fixed cost a per backend call (measured on
a stage without lookups where the plan has one; otherwise, where a lookup-free output layer is
folded into the shards before it, the intercept of a line through each stage's compute against
its lookups per shard) and per-lookup cost b_s = (c_s - a) / n_s:

    stage_s(W) = a + b_s * ceil(N_s / W) + o + bytes_s / bandwidth     (re-sharded, N_s lookups)

Latency is the sum over stages (the critical path). Prints the check against the measured
worker counts, the prediction at 16, 64 and 256 workers, and per stage how many workers it can
use before more stop helping (the gain from one more doubling falls under 5 %).

    python benchmarks/scale_model.py bench.json [--bandwidth 1e9] [--workers 16,64,256] [--fixed-call-cost S]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys


def stage_costs(trace: dict) -> list[dict]:
    stages: dict[str, dict] = {}
    for s in trace["shards"]:
        st = stages.setdefault(s["stage"], {"stage": s["stage"], "compute": [], "bytes": []})
        st["compute"].append(s["compute_s"])
        st["bytes"].append(s["bytes_in"] + s["bytes_out"])
    return [
        {"stage": st["stage"], "shards": len(st["compute"]), "c": statistics.mean(st["compute"]),
         "c_max": max(st["compute"]), "bytes": statistics.mean(st["bytes"])}
        for st in stages.values()
    ]


def trace_gap(trace: dict) -> float:
    """Median delay from a stage's last shard finishing to the next stage's first shard starting."""
    by_stage: dict[str, list[dict]] = {}
    for sh in trace["shards"]:
        by_stage.setdefault(sh["stage"], []).append(sh)
    names = list(by_stage)
    gaps = [min(s["started"] for s in by_stage[b]) - max(s["finished"] for s in by_stage[a])
            for a, b in zip(names, names[1:])]
    return max(0.0, statistics.median(gaps)) if gaps else 0.0


def predict_as_compiled(stages, w, o, bw):
    """With a worker per shard, a stage lasts as long as its slowest shard (shards of one stage
    can differ: per-shard functions may get different crypto parameters); with fewer, rounds."""
    return sum(s["c_max"] + o + s["bytes"] / bw if w >= s["shards"]
               else math.ceil(s["shards"] / w) * (s["c"] + o + s["bytes"] / bw) for s in stages)


def predict_resharded(stages, lookups, a, w, o, bw):
    total = 0.0
    for s, n in zip(stages, lookups):
        if n == 0:  # no table lookups: nothing to spread
            total += s["c"] + o + s["bytes"] / bw
            continue
        per_shard_lookups = n / s["shards"]
        b = max(0.0, s["c"] - a) / per_shard_lookups
        total += a + b * math.ceil(n / w) + o + s["bytes"] / bw
    return total


def fixed_call_cost(stages, lookups) -> tuple[float, str]:
    """The cost of a backend call that does no lookup: measured on such a stage where the plan
    has one, else the intercept of compute against lookups per shard (within [0, least compute])."""
    free = [s["c"] for s, n in zip(stages, lookups) if n == 0]
    if free:
        return min(free), "a stage without lookups"
    x = [n / s["shards"] for s, n in zip(stages, lookups)]
    y = [s["c"] for s in stages]
    if len(set(x)) < 2:
        return 0.0, "unknown (one lookup count per shard): taken as 0"
    slope = statistics.covariance(x, y) / statistics.variance(x)
    return min(max(0.0, statistics.mean(y) - slope * statistics.mean(x)), min(y)), "fit over the stages"


def useful_workers(s, n, a, o, bw) -> int:
    if n == 0:
        return 1
    b = max(0.0, s["c"] - a) / (n / s["shards"])
    w = 1
    while w < n:
        now = a + b * math.ceil(n / w) + o + s["bytes"] / bw
        nxt = a + b * math.ceil(n / (2 * w)) + o + s["bytes"] / bw
        if (now - nxt) / now < 0.05:
            break
        w *= 2
    return min(w, n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--bandwidth", type=float, default=1e9, help="bytes/s between workers (default 1e9)")
    ap.add_argument("--workers", default="16,64,256")
    ap.add_argument("--fixed-call-cost", type=float,
                    help="seconds of a backend call without lookups, where it was measured apart")
    args = ap.parse_args(argv)
    result = json.load(open(args.bench_json))
    rows, trace = result.get("scaling") or result.get("rows"), result.get("example_trace")
    if not trace or not rows:
        sys.exit("the JSON has no example_trace: run gravel bench with --workers ... --json --trace, "
                 "or benchmarks/scaling.py --json")
    stages = stage_costs(trace)
    if "overhead_per_shard_ms" in rows[0]:
        o = statistics.median(r["overhead_per_shard_ms"] for r in rows) / 1000
    else:  # benchmarks/scaling.py: the gaps between a stage's last finish and the next stage's start
        o = trace_gap(trace)
    rows = [r for r in rows if r.get("mode", "sharded") == "sharded"]  # whole runs are one call, not the plan
    lookups = [r["pbs_per_shard"] * r["shards"] for r in result["plan"]] if "plan" in result else None
    if lookups is None:
        lookups = [0 if s is stages[-1] else s["shards"] for s in stages]
    a, source = fixed_call_cost(stages, lookups)
    if args.fixed_call_cost is not None:
        a, source = args.fixed_call_cost, "given"
    out = {"per_shard_overhead_ms": 1000 * o, "fixed_call_cost_s": a, "fixed_call_cost_from": source,
           "stages": stages, "check": [], "predicted": []}
    for r in rows:
        pred = predict_as_compiled(stages, r["workers"], o, args.bandwidth)
        out["check"].append({"workers": r["workers"], "measured_s": r["latency_s"], "predicted_s": pred,
                             "error": pred / r["latency_s"] - 1})
    for w in [int(v) for v in args.workers.split(",")]:
        out["predicted"].append({
            "workers": w,
            "as_compiled_s": predict_as_compiled(stages, w, o, args.bandwidth),
            "resharded_s": predict_resharded(stages, lookups, a, w, o, args.bandwidth),
        })
    out["useful_workers_per_stage"] = {
        s["stage"]: useful_workers(s, n, a, o, args.bandwidth) for s, n in zip(stages, lookups)
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
