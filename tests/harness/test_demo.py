"""The main job, shortened: train, compile, start a real server, deploy, predict through it."""

from gravel.harness.demo import run_demo


def test_demo_runs_the_private_path_through_a_server(digits, tmp_path):
    lines = []
    r = run_demo(digits, samples=3, epochs=15, workdir=str(tmp_path), executor="local", progress=False,
                 say=lines.append)
    assert r["samples"] == 3 and r["agreement"] >= 2 / 3  # approximate rounding may flip one in ~80
    assert r["roundtrip_s"] > 0 and r["eval_key_bytes"] > 1e6 and r["input_ct_bytes"] < 1e6
    assert any(line.startswith("[5/5]") for line in lines)


def test_ckks_demo_runs_the_private_path_through_a_server(digits, tmp_path):
    from gravel.harness.demo import run_ckks_demo

    lines = []
    r = run_ckks_demo(digits, samples=2, batch=20, epochs=3, workdir=str(tmp_path), executor="local",
                      progress=False, say=lines.append)
    assert r["backend"] == "ckks" and r["samples"] == 2 and r["agreement"] == 1.0 and r["max_abs_error"] < 1e-2
    assert r["batch"] == 20 and r["batch_agreement"] == 1.0
    assert r["eval_key_bytes"] > 1e6 and r["roundtrip_s"] > 0
    assert any(line.startswith("[5/5]") for line in lines)
