"""The SDK's async variant, the deploy/predict commands, idle expiry, and the Ray engine."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import numpy as np

from gravel.client import AsyncClient, Client

from .conftest import ADMIN, ServerProcess


def test_async_client_predicts(server, deployed, digits, expected, tmp_path):
    async def main():
        async with AsyncClient(server.url, cache_dir=tmp_path) as client:
            assert [m["name"] for m in await client.models()] == [deployed]
            session = await client.session(deployed)
            single = await asyncio.gather(*(session.predict(x) for x in digits.x_test[:2]))
            batch = await session.predict_batch(digits.x_test[2:4])
            await session.close()
            return single + batch

    assert asyncio.run(main()) == expected(digits.x_test[:4])


def test_deploy_and_predict_commands(server, service_artifact, digits, expected, tmp_path):
    gravel = [sys.executable, "-m", "gravel.cli.main", "-q"]
    env = {"GRAVEL_ADMIN_TOKEN": ADMIN, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(gravel + ["deploy", str(service_artifact), "--server", server.url],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "deployed digits" in out.stdout, out.stderr
    files = []
    for i in range(2):
        np.save(tmp_path / f"img{i}.npy", digits.x_test[20 + i])
        files.append(str(tmp_path / f"img{i}.npy"))
    out = subprocess.run(gravel + ["predict", "--server", server.url, "--model", "digits",
                                   "--cache-dir", str(tmp_path / "cache"), *files],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    labels = [int(line.split("\t")[1]) for line in out.stdout.strip().splitlines()]
    assert labels == expected(digits.x_test[20:22])
    bad = subprocess.run(gravel + ["predict", "--server", server.url, "--model", "nope", files[0]],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr


def test_idle_sessions_expire_and_the_sdk_opens_a_new_one(tmp_path, service_artifact, digits, expected):
    srv = ServerProcess(tmp_path / "data", env={"GRAVEL_SESSION_TTL_S": "2", "GRAVEL_SWEEP_INTERVAL_S": "0.5"})
    srv.start()
    try:
        with Client(srv.url, token=ADMIN, cache_dir=tmp_path / "cache") as c:
            c.deploy(service_artifact)
            first = c.session("digits")
            time.sleep(3.5)
            r = httpx.get(f"{srv.url}/v1/sessions/{first.id}", headers={"Authorization": f"Bearer {first.token}"})
            assert r.status_code == 404
            assert not any((srv.data_dir / "blobs").glob(f"*/{_keys_sha(srv, first)}"))
            second = c.session("digits")
            assert second.id != first.id
            assert second.predict(digits.x_test[0]) == expected(digits.x_test[:1])[0]
    finally:
        srv.stop()


def _keys_sha(srv, session) -> str:
    import hashlib

    return hashlib.sha256(session.keys.evaluation_keys()).hexdigest()


def test_service_on_embedded_ray(tmp_path, service_artifact, digits, expected):
    srv = ServerProcess(tmp_path / "data", executor="ray").start(timeout_s=180)
    try:
        with Client(srv.url, token=ADMIN, cache_dir=tmp_path / "cache") as c:
            c.deploy(service_artifact)
            assert "Ray" in httpx.get(srv.url + "/v1/ready").json()["engine"]
            s = c.session("digits")
            assert s.predict_batch(digits.x_test[:3]) == expected(digits.x_test[:3])
            # A job cancelled while its stages run on the workers: the cluster stays usable.
            job = s.submit(digits.x_test[:4])
            while s.status(job)["status"] == "queued":
                time.sleep(0.01)
            c.request("DELETE", f"/v1/jobs/{job}", s.token)
            assert s.predict(digits.x_test[3]) == expected(digits.x_test[3:4])[0]
        assert "error e_" not in srv.log.read_text()
    finally:
        srv.stop()


def test_ckks_batch_spread_over_embedded_ray_workers(tmp_path, ckks_artifact, digits):
    """A CKKS batch of several SIMD groups on the Ray engine runs data-parallel on the workers
    and decrypts to the clear program's result; one image stays in the service process."""
    from gravel.ckks.artifact import load_program

    program = load_program(ckks_artifact[0])
    x = digits.x_test[:600]  # blocks of 256: three groups
    clear = program.simulate(x)
    srv = ServerProcess(tmp_path / "data", executor="ray").start(timeout_s=180)
    try:
        with Client(srv.url, token=ADMIN, cache_dir=tmp_path / "cache") as c:
            c.deploy(ckks_artifact[0].root)
            s = c.session("sq")
            assert s.predict_batch(x) == [int(v) for v in clear.argmax(1)]
            assert s.predict(x[0]) == int(clear[0].argmax())
            engine = httpx.get(srv.url + "/v1/ready").json()["engine"]
        assert "data-parallel (ckks) 1" in engine and "in-process (ckks) 1" in engine
        assert "error e_" not in srv.log.read_text()
    finally:
        srv.stop()
