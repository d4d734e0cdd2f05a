"""The Ray executor against real Ray processes: embedded, and two `ray start` nodes on loopback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("ray_driver.py")
RAY = Path(sys.executable).with_name("ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def drive(scenario, artifact, *extra, timeout=420):
    r = subprocess.run([sys.executable, str(DRIVER), scenario, str(artifact), *extra],
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, f"driver printed no result (rc={r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_distributed_equals_single_process(digits_artifact):
    r = drive("basic", digits_artifact)
    for run in r["runs"]:
        assert run["decrypted_equal"] and run["repeat_bytes_equal"]
        assert run["workers"] == [0, 1]  # both workers took shards
        # the output layer is folded into the hidden layer's 4 shards: one stage, no gather
        stages = {s["stage"] for s in run["trace"]["shards"]}
        assert stages == {"stage0"} and len(run["trace"]["shards"]) == 4
        for s in run["trace"]["shards"]:
            assert s["compute_s"] > 0 and s["bytes_in"] > 0 and s["bytes_out"] > 0 and s["queue_s"] >= 0
    # four inferences, yet each worker deserialized the session's keys exactly once
    assert [w["key_loads"] for w in r["worker_stats"]] == [1, 1]
    assert all(w["shards_run"] >= 4 for w in r["worker_stats"])
    assert "evaluation keys" in r["foreign_keys_error"] and "another model" in r["foreign_keys_error"]
    # as many requests as workers run data-parallel: whole inferences, both workers busy
    assert r["mode"] == "sharded" and r["many_mode"] == "data-parallel" and r["many_equal"]
    assert r["many_workers"] == [0, 1] and r["many_stages"] == ["whole"]
    # one worker runs the whole network in one call with both cores of the node
    assert r["one_worker"] == {"mode": "whole", "threads": 2, "calls": 1, "decrypted_equal": True}


def test_killed_worker_shards_are_retried(digits_artifact):
    r = drive("kill-worker", digits_artifact)
    assert r["finished"] and r["retries"] >= 1 and r["decrypted_equal"]


def test_inference_that_cannot_finish_fails_fast(digits_artifact):
    r = drive("timeout", digits_artifact)
    assert "did not finish" in r["error"] and r["seconds"] < 30


def test_bad_address_and_full_cluster_fail_in_seconds(digits_artifact):
    r = drive("bad-address", digits_artifact)
    assert "no Ray cluster answers at 127.0.0.1:1" in r["error"] and r["seconds"] < 10
    r = drive("no-free-cpus", digits_artifact)
    assert "free CPUs" in r["error"] and r["seconds"] < 10


@pytest.fixture
def two_node_cluster(tmp_path):
    port = "6392"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=ENV)
    subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                   check=True, capture_output=True, env=ENV, timeout=120)
    try:
        subprocess.run([str(RAY), "start", f"--address=127.0.0.1:{port}", *common],
                       check=True, capture_output=True, env=ENV, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=ENV, timeout=120)


def test_shards_run_on_two_ray_nodes(digits_artifact, two_node_cluster):
    r = drive("multinode", digits_artifact, two_node_cluster)
    for run in r["runs"]:
        assert len(run["nodes"]) == 2, "shards must have run on both nodes"
        assert len({s["node"] for s in run["trace"]["shards"]}) == 2
        assert run["decrypted_equal"]
