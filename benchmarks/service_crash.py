"""SIGKILL `gravel serve` during a key upload and during an inference, restart, and check.

After each kill: SQLite's integrity check, the rows and blobs acknowledged before the kill,
no partial upload left behind, the interrupted request retried, the acknowledged job finished
after the restart, and an earlier session predicting correctly with its old token.

    .venv/bin/python benchmarks/service_crash.py
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np


def _slow(body: bytes, parts: int = 100, pause_s: float = 0.05):
    step = len(body) // parts + 1
    for i in range(0, len(body), step):
        time.sleep(pause_s)
        yield body[i : i + step]


def _store_state(data_dir: Path) -> dict:
    db = sqlite3.connect(data_dir / "gravel.db")
    try:
        return {
            "integrity": db.execute("PRAGMA integrity_check").fetchone()[0],
            "models": db.execute("SELECT COUNT(*) FROM models").fetchone()[0],
            "sessions": sorted(r[0] for r in db.execute("SELECT id FROM sessions")),
            "leftover_tmp_files": len(list((data_dir / "tmp").iterdir())),
        }
    finally:
        db.close()


def main() -> None:
    from gravel.client import Client, ClientModel
    from gravel.compiler import load_graph
    from gravel.data import load_dataset
    from gravel.harness.demo import small_artifact
    from gravel.service.process import ServiceProcess

    data = load_dataset("digits")
    work = Path(tempfile.mkdtemp(prefix="gravel-crash-"))
    manifest = small_artifact(data, work, hidden=(16,), p_error=1e-4, rounding="exact",
                              say=lambda s: print(s, file=sys.stderr))
    clear = load_graph(manifest).predict(data.x_test[:20])
    server = ServiceProcess(work / "data", "bench-admin").start()
    report: dict = {}
    try:
        admin = Client(server.url, token="bench-admin", cache_dir=work / "cache-a")
        admin.deploy(manifest.root)
        a = admin.session(manifest.name)
        before = _store_state(server.data_dir)

        # 1. Kill during a key upload.
        body = ClientModel.load(manifest.root).keygen().evaluation_keys()
        cut = {}

        def upload():
            try:
                httpx.post(f"{server.url}/v1/models/{manifest.name}/sessions", content=_slow(body),
                           headers={"Content-Type": "application/octet-stream"}, timeout=120)
            except httpx.HTTPError as exc:
                cut["error"] = type(exc).__name__

        th = threading.Thread(target=upload)
        th.start()
        time.sleep(1.5)
        server.kill()
        th.join(30)
        t = time.perf_counter()
        server.start()
        restart_s = time.perf_counter() - t
        after = _store_state(server.data_dir)
        b_client = Client(server.url, cache_dir=work / "cache-b")
        b = b_client.session(manifest.name)
        report["kill_during_key_upload"] = {
            "client_saw": cut.get("error", "no error"),
            "integrity": after["integrity"],
            "acknowledged_intact": after["sessions"] == before["sessions"] and after["models"] == 1,
            "leftover_tmp_files": after["leftover_tmp_files"],
            "restart_s": round(restart_s, 2),
            "retry_ok": b.predict(data.x_test[0]) == int(clear[0]),
            "old_session_ok": a.predict(data.x_test[1]) == int(clear[1]),
        }

        # 2. Kill during inference: a persisted job (acknowledged) and a synchronous request (not).
        job = a.submit(data.x_test[10:16])
        sync = {}

        def sync_predict():
            try:
                b.predict(data.x_test[2])
            except Exception as exc:  # noqa: BLE001
                sync["error"] = type(exc).__name__

        th = threading.Thread(target=sync_predict)
        th.start()
        deadline = time.time() + 60
        while a.status(job)["status"] != "running" and time.time() < deadline:
            time.sleep(0.05)
        done_at_kill = a.status(job)["done"]
        server.kill()
        th.join(30)
        t = time.perf_counter()
        server.start()
        restart_s = time.perf_counter() - t
        state = _store_state(server.data_dir)
        preds = [int(np.argmax(s)) for s in a.result(job)]
        report["kill_during_inference"] = {
            "job_items_done_at_kill": done_at_kill,
            "sync_client_saw": sync.get("error", "no error"),
            "integrity": state["integrity"],
            "acknowledged_intact": state["sessions"] == sorted([a.id, b.id]),
            "restart_s": round(restart_s, 2),
            "job_finished_after_restart": preds == [int(c) for c in clear[10:16]],
            "retry_ok": b.predict(data.x_test[2]) == int(clear[2]),
        }
        admin.close()
        b_client.close()
    finally:
        server.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
