"""The stage commands, run as a user would, each party's step on its own."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


def gravel(*args, check=True, env=None):
    return subprocess.run([sys.executable, "-m", "gravel.cli.main", "-q", *map(str, args)],
                          capture_output=True, text=True, check=check, timeout=300, env=env)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, digits_artifact, digits):
    """`gravel keygen` and `gravel encrypt` once for the module: keys and one input ciphertext."""
    d = tmp_path_factory.mktemp("cli")
    out = gravel("keygen", digits_artifact, "--secret", d / "s.key", "--eval-keys", d / "e.evk")
    assert "(keep it private)" in out.stdout and (d / "s.key").stat().st_mode & 0o777 == 0o600
    np.save(d / "img.npy", digits.x_test[3])
    out = gravel("encrypt", digits_artifact, "--secret", d / "s.key", "--image", d / "img.npy", "--out", d / "x.ct")
    assert "encrypted in" in out.stdout
    return d


def test_keygen_encrypt_run_decrypt(tmp_path, digits_artifact, keyed):
    out = gravel("run", digits_artifact, "--eval-keys", keyed / "e.evk", "--input", keyed / "x.ct",
                 "--out", tmp_path / "y.ct")
    assert "fused: the whole network in one backend call" in out.stdout  # one process: the fastest plan
    res = json.loads(gravel("decrypt", digits_artifact, "--secret", keyed / "s.key",
                            "--input", tmp_path / "y.ct").stdout)
    assert 0 <= res["prediction"] < 10 and len(res["scores"]) == 10


def test_errors_are_one_clear_line(tmp_path, digits_artifact, keyed):
    np.save(tmp_path / "big.npy", np.zeros((28, 28), np.float32))
    r = gravel("encrypt", digits_artifact, "--secret", keyed / "s.key", "--image", tmp_path / "big.npy",
               "--out", tmp_path / "x.ct", check=False)
    assert r.returncode == 2 and "expects (1, 8, 8)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.ct").exists()
    r = gravel("run", digits_artifact, "--eval-keys", keyed / "s.key", "--input", keyed / "s.key",
               "--out", tmp_path / "y.ct", check=False)
    assert r.returncode == 2 and "expected evaluation keys, got secret keys" in r.stderr


def test_run_on_embedded_ray(tmp_path, digits_artifact, keyed):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    r = gravel("run", digits_artifact, "--eval-keys", keyed / "e.evk", "--input", keyed / "x.ct",
               "--out", tmp_path / "y.ct", "--workers", "2", "--trace", tmp_path / "t.json", check=False, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ran sharded on 2 Ray workers" in r.stdout
    assert len(json.loads((tmp_path / "t.json").read_text())["shards"]) == 4  # one stage: the output layer folded in
    res = json.loads(gravel("decrypt", digits_artifact, "--secret", keyed / "s.key",
                            "--input", tmp_path / "y.ct").stdout)
    assert 0 <= res["prediction"] < 10


def test_compile_finetunes_the_quantized_program(tmp_path, digits):
    """`gravel compile --finetune`: a float ONNX model at coarse widths, fine-tuned on the
    training set; the note and the manifest say what it did."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.from_numpy(digits.x_train).float(), torch.from_numpy(digits.y_train).long()
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.onnx.export(model.eval(), (x[:1],), str(tmp_path / "m.onnx"), dynamo=False)
    out = gravel("compile", tmp_path / "m.onnx", "--data", "digits", "--out", tmp_path / "m.gravel",
                 "--a-bits", "3", "--tlu-bits", "4", "--finetune", "2").stdout
    assert "fine-tun" in out, out
    manifest = json.loads((tmp_path / "m.gravel" / "manifest.json").read_text())
    report = manifest["model"]["finetune"]
    assert report["samples"] == len(digits.x_train) and report["epochs"] == 2


def test_compile_tiles_convolutional_layers_for_workers(tmp_path, digits):
    """`gravel compile --shards 2 --tiles`: a float CNN's convolutional layers run in two row
    tiles with a halo, one call per worker; the note says what merged and what the halo costs."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 10)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(tmp_path / "cnn.onnx"), dynamo=False)
    out = gravel("compile", tmp_path / "cnn.onnx", "--data", "digits", "--out", tmp_path / "cnn.gravel",
                 "--shards", "2", "--tiles", "--calib", "100").stdout
    assert "row tiles with a halo" in out, out
    plan = json.loads((tmp_path / "cnn.gravel" / "manifest.json").read_text())["plan"]
    assert plan[0]["axis"] == 1 and plan[0]["shards"] == 2 and len(plan[0]["functions"]) == 2


def test_check_runs_from_the_command_line_with_and_without_finetuning(digits_checkpoint):
    # `gravel check` read --finetune, which only `compile` defined: every check crashed
    base = ["check", digits_checkpoint, "--data", "digits", "--samples", "100", "--sim-samples", "5",
            "--fhe-samples", "0", "--no-advice", "--json"]
    plain = json.loads(gravel(*base).stdout)
    assert plain["supported"] and plain["table_lookups"] > 0 and plain["accuracy_simulated"] is not None
    assert not any(w.startswith("fine-tun") for w in plain["warnings"])
    tuned = json.loads(gravel(*base, "--finetune", "1", "--finetune-samples", "300").stdout)
    # fine-tuned, or kept as quantized where no epoch beat it: either way check says so
    assert any(w.startswith("fine-tun") for w in tuned["warnings"]), tuned["warnings"]
