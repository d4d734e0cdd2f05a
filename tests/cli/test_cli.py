"""The stage commands, run as a user would, each party's step on its own."""

import json
import subprocess
import sys

import numpy as np


def gravel(*args, check=True):
    return subprocess.run([sys.executable, "-m", "gravel.cli.main", "-q", *map(str, args)],
                          capture_output=True, text=True, check=check, timeout=300)


def test_keygen_encrypt_run_decrypt(tmp_path, digits_artifact, digits):
    gravel("keygen", digits_artifact, "--secret", tmp_path / "s.key", "--eval-keys", tmp_path / "e.evk")
    np.save(tmp_path / "img.npy", digits.x_test[3])
    gravel("encrypt", digits_artifact, "--secret", tmp_path / "s.key", "--image", tmp_path / "img.npy",
           "--out", tmp_path / "x.ct")
    out = gravel("run", digits_artifact, "--eval-keys", tmp_path / "e.evk", "--input", tmp_path / "x.ct",
                 "--out", tmp_path / "y.ct")
    assert "stage0" in out.stdout
    res = json.loads(gravel("decrypt", digits_artifact, "--secret", tmp_path / "s.key",
                            "--input", tmp_path / "y.ct").stdout)
    assert 0 <= res["prediction"] < 10 and len(res["scores"]) == 10


def test_errors_are_one_clear_line(tmp_path, digits_artifact):
    np.save(tmp_path / "big.npy", np.zeros((28, 28), np.float32))
    gravel("keygen", digits_artifact, "--secret", tmp_path / "s.key", "--eval-keys", tmp_path / "e.evk")
    r = gravel("encrypt", digits_artifact, "--secret", tmp_path / "s.key", "--image", tmp_path / "big.npy",
               "--out", tmp_path / "x.ct", check=False)
    assert r.returncode == 2 and "expects (1, 8, 8)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.ct").exists()
    r = gravel("run", digits_artifact, "--eval-keys", tmp_path / "s.key", "--input", tmp_path / "s.key",
               "--out", tmp_path / "y.ct", check=False)
    assert r.returncode == 2 and "expected evaluation keys, got secret keys" in r.stderr


def test_run_on_embedded_ray(tmp_path, digits_artifact, digits):
    import os

    gravel("keygen", digits_artifact, "--secret", tmp_path / "s.key", "--eval-keys", tmp_path / "e.evk")
    np.save(tmp_path / "img.npy", digits.x_test[5])
    gravel("encrypt", digits_artifact, "--secret", tmp_path / "s.key", "--image", tmp_path / "img.npy",
           "--out", tmp_path / "x.ct")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-m", "gravel.cli.main", "-q", "run", str(digits_artifact),
                        "--eval-keys", str(tmp_path / "e.evk"), "--input", str(tmp_path / "x.ct"),
                        "--out", str(tmp_path / "y.ct"), "--workers", "2", "--trace", str(tmp_path / "t.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ran on 2 Ray workers" in r.stdout
    assert len(json.loads((tmp_path / "t.json").read_text())["shards"]) == 5
    res = json.loads(gravel("decrypt", digits_artifact, "--secret", tmp_path / "s.key",
                            "--input", tmp_path / "y.ct").stdout)
    assert 0 <= res["prediction"] < 10
