"""SIGKILL the server during a deploy, during a key upload and during an inference job, then
start it again: it comes up, and nothing acknowledged is lost."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import numpy as np

from gravel.client import Client

from .conftest import ADMIN, ServerProcess


def _slow(body: bytes, parts: int = 50, pause_s: float = 0.05):
    step = len(body) // parts + 1
    for i in range(0, len(body), step):
        time.sleep(pause_s)
        yield body[i : i + step]


def _ignore_errors(call, *args) -> None:
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - the server is killed under this call on purpose
        pass


def test_sigkill_during_deploy_key_upload_and_inference(tmp_path, service_artifact, digits, expected):
    srv = ServerProcess(tmp_path / "data").start()
    try:
        admin = Client(srv.url, token=ADMIN, cache_dir=tmp_path / "cache-a")

        # 0. Killed while a deploy is being processed: its unpacked artifact is a directory in
        # tmp/, which start-up used to trip over (IsADirectoryError, the service stayed down).
        deploy = threading.Thread(target=lambda: _ignore_errors(admin.deploy, service_artifact))
        deploy.start()
        deadline = time.time() + 60
        while not any(p.is_dir() for p in (srv.data_dir / "tmp").iterdir()) and time.time() < deadline:
            time.sleep(0.01)
        assert any(p.is_dir() for p in (srv.data_dir / "tmp").iterdir())
        srv.kill()
        deploy.join(30)
        srv.start()
        assert not any((srv.data_dir / "tmp").iterdir())
        assert httpx.get(srv.url + "/v1/models").json()["models"] == []  # never acknowledged
        admin.deploy(service_artifact)
        a = admin.session("digits")
        assert a.predict(digits.x_test[0]) == expected(digits.x_test[:1])[0]

        # 1. Killed while a second client's evaluation keys are streaming in.
        from gravel.client import ClientModel

        body = ClientModel.load(service_artifact).keygen().evaluation_keys()
        failure = {}

        def upload():
            try:
                httpx.post(f"{srv.url}/v1/models/digits/sessions", content=_slow(body),
                           headers={"Content-Type": "application/octet-stream"}, timeout=60)
            except httpx.HTTPError as exc:
                failure["error"] = exc

        t = threading.Thread(target=upload)
        t.start()
        time.sleep(1.0)
        srv.kill()
        t.join(30)
        assert "error" in failure  # the upload was cut, never acknowledged
        srv.start()
        db = sqlite3.connect(srv.data_dir / "gravel.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 1  # only a's
        db.close()
        assert not any((srv.data_dir / "tmp").iterdir())  # the partial upload is gone
        assert a.predict(digits.x_test[1]) == expected(digits.x_test[1:2])[0]
        b_client = Client(srv.url, cache_dir=tmp_path / "cache-b")
        b = b_client.session("digits")  # the retry succeeds
        assert b.id != a.id and b.predict(digits.x_test[2]) == expected(digits.x_test[2:3])[0]

        # 2. Killed while a job (acknowledged) and a synchronous inference (not) are running.
        x = digits.x_test[10:14]
        job = a.submit(x)
        sync_failure = {}

        def sync_predict():
            try:
                b.predict(digits.x_test[3])
            except Exception as exc:  # noqa: BLE001
                sync_failure["error"] = exc

        t = threading.Thread(target=sync_predict)
        t.start()
        deadline = time.time() + 60
        while a.status(job)["status"] != "running" and time.time() < deadline:
            time.sleep(0.05)
        srv.kill()
        t.join(30)
        assert "error" in sync_failure
        srv.start()
        # The acknowledged job was re-queued and finishes; the cut request can simply be retried.
        assert [int(np.argmax(s)) for s in a.result(job)] == expected(x)
        assert b.predict(digits.x_test[3]) == expected(digits.x_test[3:4])[0]
        b_client.close()
        admin.close()
    finally:
        srv.stop()
