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
