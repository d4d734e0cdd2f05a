"""Issue 10, items 4 and 7, on a server of its own whose data directory is a small tmpfs (in a
user and mount namespace, so no root is needed) and whose open-file limit is low: a full disk
answers 507 and fails the job that could not store its result, reads go on working, nothing
stored is damaged; slow clients do not starve health checks."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from gravel.protocol import pack_batch, unpack_batch

from .conftest import ADMIN, OCTETS, ServerProcess, open_session

NOFILE = 100  # the connection cap becomes (NOFILE - 48) // 2 = 26, with a backlog of 6
TMPFS_MB = 128  # the model (~50 kB), one key set (63 MB), one upload of keys in tmp/


def _namespaces_work() -> bool:
    if not shutil.which("unshare") or not shutil.which("prlimit"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt || mount -t tmpfs -o size=1m tmpfs /tmp"],
                           capture_output=True, check=False)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs unprivileged user namespaces (tmpfs)")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, service_artifact):
    data = tmp_path_factory.mktemp("faults") / "data"
    data.mkdir()
    launcher = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--",
                "unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                f'mount -t tmpfs -o size={TMPFS_MB}m tmpfs "$0" && exec "$@"', str(data)]
    srv = ServerProcess(data, launcher=launcher, env={"GRAVEL_HEADER_TIMEOUT_S": "3"}).start()
    from gravel.client import Client

    with Client(srv.url, token=ADMIN, cache_dir=data.parent / "cache") as c:
        c.deploy(service_artifact)
    yield srv
    srv.stop()


def _inside(srv, *parts: str) -> str:
    """A path in the server's data directory as the server sees it (its tmpfs)."""
    return os.path.join(f"/proc/{srv.proc.pid}/root", str(srv.data_dir).lstrip("/"), *parts)


def _fill(srv, name: str = "filler", leave: int = 0) -> str:
    """Fill the server's disk but `leave` bytes; returns the filler's path."""
    path = _inside(srv, name)
    if leave:
        st = os.statvfs(_inside(srv))
        with open(path, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
        return path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def test_a_full_disk_answers_507_fails_the_job_and_damages_nothing(small_server, service_keys, digits, expected):
    srv = small_server
    model, keys, good = service_keys
    sid, headers = open_session(srv.url, "digits", good)
    x = digits.x_test[:4]
    cts = [model.encrypt(keys, img) for img in x]
    url = f"{srv.url}/v1/sessions/{sid}"

    # Stored before the disk fills: a finished job, not yet fetched.
    first = httpx.post(f"{url}/jobs", content=cts[0], headers=headers).json()["job"]
    while httpx.get(f"{srv.url}/v1/jobs/{first}", headers=headers).json()["status"] != "done":
        time.sleep(0.05)
    # Acknowledged on an almost full disk, which then fills while it runs: its result cannot be stored.
    almost = _fill(srv, "almost", leave=1 << 20)
    r = httpx.post(f"{url}/jobs", content=pack_batch(cts), headers=headers)
    assert r.status_code == 202
    running = r.json()["job"]
    filler = _fill(srv)
    try:
        deadline = time.time() + 120
        while (st := httpx.get(f"{srv.url}/v1/jobs/{running}", headers=headers).json())["status"] in (
                "queued", "running") and time.time() < deadline:
            time.sleep(0.1)
        assert st["status"] == "failed" and "disk is full" in st["error"], st  # not "running" forever
        r = httpx.get(f"{srv.url}/v1/jobs/{running}/result", headers=headers)
        assert r.status_code == 507 and "disk is full" in r.json()["detail"]
        # New work that must be stored is refused with 507 and a message...
        for path, body, hdrs in ((f"{url}/jobs", cts[1], headers), (f"{url}/infer", cts[1], headers),
                                 (f"{srv.url}/v1/models/digits/sessions", good, {"Content-Type": OCTETS})):
            r = httpx.post(path, content=body, headers=hdrs, timeout=120)
            assert r.status_code == 507, (path, r.text)
            assert "disk is full" in r.json()["detail"] and "error id" in r.json()["detail"]
        # ...while reads need no write.
        assert httpx.get(f"{srv.url}/v1/models").status_code == 200
        assert httpx.get(url, headers=headers).status_code == 200
        r = httpx.get(f"{srv.url}/v1/jobs/{first}/result", headers=headers)
        assert r.status_code == 200 and model.predict(keys, r.content) == expected(x[:1])[0]
        assert httpx.get(srv.url + "/v1/health").status_code == 200
    finally:
        os.unlink(filler)
        os.unlink(almost)
    # Space again: nothing stored was damaged, and everything works.
    ready = httpx.get(srv.url + "/v1/ready").json()
    assert ready["ready"] and ready["models"] == 1
    r = httpx.post(f"{url}/infer", content=pack_batch(cts[:2]), headers=headers, timeout=120)
    assert r.status_code == 200
    assert [model.predict(keys, c) for c in unpack_batch(r.content)] == expected(x[:2])
    r = httpx.get(f"{srv.url}/v1/jobs/{first}/result", headers=headers)
    assert r.status_code == 200 and model.predict(keys, r.content) == expected(x[:1])[0]
    # Every fault the server logged was the disk's: its own code did not fail.
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", srv.log.read_text())
    faults = [r for r in records if re.search(r" error e_[0-9a-f]+", r)]
    assert faults and all("disk is full" in r or "StorageFullError" in r for r in faults), faults


def test_slow_clients_do_not_starve_health_checks_under_a_low_file_limit(small_server):
    srv = small_server
    host, port = srv.url.split("//")[1].split(":")
    slow = []
    try:
        for _ in range(NOFILE):  # as many as the server may have open files
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v1/models/digits/sessions HTTP/1.1\r\nHost: x\r\nContent-")
            slow.append(s)
        for _ in range(10):
            assert httpx.get(srv.url + "/v1/health", timeout=5).status_code == 200
        assert httpx.get(srv.url + "/v1/ready", timeout=5).json()["ready"]
    finally:
        for s in slow:
            s.close()
    assert "Too many open files" not in srv.tail(20000)

