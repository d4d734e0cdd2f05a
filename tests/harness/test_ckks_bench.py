"""The CKKS benchmark harness and `gravel compile/bench --backend ckks`, run as a user would."""

import json
import subprocess
import sys

import pytest

from gravel.harness.ckks_bench import bench_ckks
from tests.ckks.conftest import train_digits_mlp


@pytest.fixture(scope="module")
def sq_model(digits):
    return train_digits_mlp(digits, "square")


@pytest.fixture(scope="module")
def sq_artifact(tmp_path_factory, digits, sq_model):
    from gravel.ckks.artifact import compile_ckks_model

    out = tmp_path_factory.mktemp("ckks-bench") / "sq.gravel"
    return compile_ckks_model(sq_model, digits.x_train[:300], out, digits.y_train[:300], name="sq")


def test_bench_fields_single_and_batch(digits, sq_artifact):
    r = bench_ckks(sq_artifact.root, digits, samples=2)
    for key in ("latency_s", "eval_key_bytes", "input_ct_bytes", "output_ct_bytes", "agreement",
                "accuracy_clear", "accuracy_encrypted", "max_abs_error"):
        assert key in r
    assert r["agreement"] == 1.0 and r["max_abs_error"] < 1e-2 and r["reference"] == "clear CKKS program"
    b = bench_ckks(sq_artifact.root, digits, batch=40)
    assert b["batch"] == 40 and b["per_image_s"] * 40 == pytest.approx(b["batch_latency_s"], rel=1e-2, abs=1e-4)
    assert b["agreement"] == 1.0 and b["eval_key_bytes"] < r["eval_key_bytes"]  # 3 rotation keys


def test_cli_compile_and_bench(tmp_path, digits, sq_model):
    import torch

    onnx = tmp_path / "sq.onnx"
    torch.onnx.export(sq_model, torch.tensor(digits.x_test[:1]), str(onnx), dynamo=False)

    def gravel(*args):
        return subprocess.run([sys.executable, "-m", "gravel.cli.main", "-q", *map(str, args)],
                              capture_output=True, text=True, check=True, timeout=300)

    out = gravel("compile", onnx, "--backend", "ckks", "--data", "digits", "--calib", 200,
                 "--out", tmp_path / "sq.gravel")
    assert "for CKKS" in out.stdout and "depth 3" in out.stdout and "kept exactly" in out.stdout
    r = json.loads(gravel("bench", tmp_path / "sq.gravel", "--backend", "ckks", "--data", "digits",
                          "--samples", 1, "--json").stdout)
    assert r["backend"] == "ckks" and r["agreement"] == 1.0 and r["samples"] == 1
