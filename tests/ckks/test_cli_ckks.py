"""The client and server commands on a CKKS artifact, each party's step on its own."""

import json
import subprocess
import sys

import numpy as np


def gravel(*args, check=True):
    return subprocess.run([sys.executable, "-m", "gravel.cli.main", "-q", *map(str, args)],
                          capture_output=True, text=True, check=check, timeout=300)


def test_keygen_encrypt_run_decrypt_a_ckks_artifact(tmp_path, sq_artifact, digits):
    from gravel.ckks.artifact import load_program

    art = sq_artifact.root
    out = gravel("keygen", art, "--secret", tmp_path / "s.key", "--eval-keys", tmp_path / "e.evk")
    assert "(keep it private)" in out.stdout and (tmp_path / "s.key").stat().st_mode & 0o777 == 0o600
    np.save(tmp_path / "img.npy", digits.x_test[7])
    gravel("encrypt", art, "--secret", tmp_path / "s.key", "--image", tmp_path / "img.npy", "--out", tmp_path / "x.ct")
    out = gravel("run", art, "--eval-keys", tmp_path / "e.evk", "--input", tmp_path / "x.ct", "--out", tmp_path / "y.ct")
    assert "CKKS" in out.stdout
    res = json.loads(gravel("decrypt", art, "--secret", tmp_path / "s.key", "--input", tmp_path / "y.ct").stdout)
    clear = load_program(art).simulate(digits.x_test[7:8])[0]
    assert res["prediction"] == int(clear.argmax()) and np.allclose(res["scores"], clear, atol=1e-2)
    bad = gravel("run", art, "--eval-keys", tmp_path / "s.key", "--input", tmp_path / "x.ct",
                 "--out", tmp_path / "z.ct", check=False)
    assert bad.returncode == 2 and "expected evaluation keys, got secret keys" in bad.stderr
