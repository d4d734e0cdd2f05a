"""The store on its own: atomic blobs named by SHA-256, rows, garbage, expiry (real SQLite)."""

from __future__ import annotations

import hashlib
import time

import pytest

from gravel.service.store import Store, TooLarge


def test_blobs_are_named_by_hash_and_orphans_go_at_start(tmp_path):
    store = Store(tmp_path)
    with store.lock:
        blob = store.put_bytes(b"keys" * 1000)
        store.add_model("m", "00" * 32, "aa", {"manifest.json": blob.sha}, {"model": {"name": "m"}})
    assert blob.sha == hashlib.sha256(b"keys" * 1000).hexdigest()
    assert store.read_blob(blob.sha) == b"keys" * 1000
    with store.lock:
        orphan = store.put_bytes(b"never referenced")  # as if killed before its row was committed
    (tmp_path / "tmp" / "upload-partial").write_bytes(b"half an upload")
    # A deploy or a model view killed half-way leaves directories, with files inside.
    for d in ("artifact-abc", "view-def"):
        (tmp_path / "tmp" / d / "inner").mkdir(parents=True)
        (tmp_path / "tmp" / d / "inner" / "server.zip").write_bytes(b"partial")
    store.close()
    store = Store(tmp_path)
    assert not store.blob_path(orphan.sha).exists()
    assert store.blob_path(blob.sha).exists() and not any((tmp_path / "tmp").iterdir())
    assert store.get_model("m")["files"] == {"manifest.json": blob.sha}
    assert store.integrity() == "ok"


def test_limits_sessions_jobs_and_expiry(tmp_path):
    store = Store(tmp_path)
    w = store.writer(limit=10)
    with pytest.raises(TooLarge):
        w.write(b"x" * 11)
    w.discard()
    with store.lock:
        keys = store.put_bytes(b"evaluation keys")
        store.add_model("m", "00" * 32, "aa", {}, {})
        store.add_session("s1", "m", "hash", keys)
        store.add_session("s2", "m", "hash", keys)  # the same keys twice: one blob
        inp = store.put_bytes(b"input")
        store.add_job("j1", "s1", 1, inp.sha)
    assert [j["id"] for j in store.unfinished_jobs()] == ["j1"]
    store.finish_job("j1", b"result")
    job = store.get_job("j1")
    assert job["status"] == "done" and job["input_sha"] is None and not store.blob_path(inp.sha).exists()
    assert store.read_blob(job["result_sha"]) == b"result"
    store.delete_session("s1")  # its job goes with it; the shared keys stay for s2
    assert store.get_job("j1") is None and store.blob_path(keys.sha).exists()
    assert store.expire(session_ttl_s=3600, result_ttl_s=3600, fetched_grace_s=300) == []
    time.sleep(0.01)
    assert store.expire(session_ttl_s=0.0, result_ttl_s=3600, fetched_grace_s=300, busy={"s2"}) == []
    assert store.expire(session_ttl_s=0.0, result_ttl_s=3600, fetched_grace_s=300) == ["s2"]
    assert not store.blob_path(keys.sha).exists()
    assert store.delete_model("m") == [] and store.get_model("m") is None
