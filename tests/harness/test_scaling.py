"""`gravel bench --workers` on an embedded Ray, its plot, and the scale model fed by it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_workers_plot_and_scale_model(tmp_path, digits_artifact):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "gravel.cli.main", "-q", "bench", str(digits_artifact), "--data", "digits",
         "--samples", "2", "--workers", "1,2", "--json", "--trace", "--plot", str(tmp_path / "s.png")],
        capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    rows = result["scaling"]
    assert [row["workers"] for row in rows] == [1, 2]
    # speed-ups are against the fastest single process (the fused program) in the same run
    base = result["baseline"]
    assert base["path"] == "fused, one process" and base["latency_s"] > 0
    for row in rows:
        assert row["latency_s"] > 0 and row["throughput_per_s"] > 0 and row["agreement"] >= 0.5
        assert abs(row["speedup"] - base["latency_s"] / row["latency_s"]) < 1e-9
        assert row["throughput_mode"] == "data-parallel"  # a queue of requests: whole inferences
    # one worker runs the whole network in one call; two share each stage's shards
    assert [row["mode"] for row in rows] == ["whole", "sharded"]
    assert (tmp_path / "s.png").stat().st_size > 10_000
    (tmp_path / "b.json").write_text(json.dumps(result))
    m = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_model.py"), str(tmp_path / "b.json")],
                       capture_output=True, text=True, check=True)
    model = json.loads(m.stdout)
    assert [c["workers"] for c in model["check"]] == [2]  # the sharded rows (one worker runs whole)
    assert all(p["resharded_s"] <= p["as_compiled_s"] + 1e-9 for p in model["predicted"])
    assert set(model["useful_workers_per_stage"]) == {"stage0"}  # the output layer folded into its shards
