"""Issue 10's hostile-input and fault probe, against a fresh `gravel serve` (local executor,
digits model with exact rounding, so every encrypted prediction must equal the clear model's).

Cases: SIGKILL during a deploy; hostile deploy archives and manifests; key uploads of the wrong
declared size, with a wrong header, oversized and streamed (three at once, peak RSS measured),
valid ones racing for the key-load slots; a flood of connections stuck in their headers; a
slow body; a wrong-typed ciphertext submitted as a job; a session over its quota; a dropped
/infer; 16 concurrent clients while one session's large batch is cancelled; SIGKILL during
acknowledged jobs; a full disk (server on a small tmpfs in a user namespace, where allowed).
After each case: is the server up? At the end: is everything acknowledged still there?

Counts every status the server answered. 503 (busy key-load slots, with Retry-After) and 507
(full disk) are deliberate answers of the server to those cases and are counted apart; any
other 5xx is a server error, and there must be none.

    .venv/bin/python benchmarks/service_probe.py [--clients 16] [--batch 64] [--no-full-disk]
Prints one JSON object (progress on stderr).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ADMIN = "probe-admin"
OCTETS = "application/octet-stream"
MiB = 1 << 20


def say(text: str) -> None:
    print(f"[probe] {text}", file=sys.stderr, flush=True)


class Probe:
    """Sends the cases' requests and keeps every status the server answered."""

    def __init__(self) -> None:
        self.statuses: collections.Counter[int] = collections.Counter()
        self.server_errors: list[str] = []
        self.case = ""
        self.down_after: list[str] = []

    def record(self, status: int, what: str) -> int:
        self.statuses[status] += 1
        deliberate = (status == 503 and self.case in ("concurrent key loads", "oversized key uploads")) or (
            status == 507 and self.case == "full disk")
        if status >= 500 and not deliberate:
            self.server_errors.append(f"{self.case}: {what} -> {status}")
        return status

    def http(self, method: str, url: str, **kw) -> httpx.Response:
        r = httpx.request(method, url, timeout=kw.pop("timeout", 300), **kw)
        self.record(r.status_code, f"{method} {url.split('/v1')[-1]}")
        return r

    def raw(self, url: str, head: bytes, body: bytes = b"", wait_s: float = 10.0) -> int:
        """Raw bytes on a socket; returns the answer's status (0 when the server just closed)."""
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=wait_s) as s:
            s.sendall(head + body)
            try:
                answer = s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                answer = b""
        status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        return self.record(status, "raw " + head.split(b"\r\n")[0].decode()) if status else 0

    def check_up(self, url: str) -> None:
        try:
            ok = httpx.get(url + "/v1/ready", timeout=30).json()["ready"]
        except (httpx.HTTPError, ValueError, KeyError):
            ok = False
        if not ok:
            self.down_after.append(self.case)


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def tar_of(files: dict[str, bytes], pax: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"m.gravel/{name}")
            info.size = len(data)
            info.pax_headers = pax or {}
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="the large batch that gets cancelled (= the quota)")
    ap.add_argument("--no-full-disk", action="store_true")
    args = ap.parse_args()

    from gravel.client import Client, ClientModel
    from gravel.compiler import load_graph
    from gravel.data import load_dataset
    from gravel.harness.demo import small_artifact
    from gravel.protocol import Kind, frame, pack_batch, unpack_batch
    from gravel.protocol.manifest import CLIENT_FILES, MANIFEST, SERVER_FILES, shard_function
    from gravel.service.process import ServiceProcess

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    data = load_dataset("digits")
    work = Path(tempfile.mkdtemp(prefix="gravel-probe-"))
    manifest = small_artifact(data, work, hidden=(16,), p_error=1e-4, rounding="exact", say=say)
    graph = load_graph(manifest)
    files = {n: manifest.path(n).read_bytes() for n in (MANIFEST, *CLIENT_FILES, *SERVER_FILES)}
    model = ClientModel.load(manifest.root)
    keys = model.keygen()
    good = keys.evaluation_keys()
    x = data.x_test[: max(args.batch, args.clients * args.per_client)]
    clear = [int(p) for p in graph.predict(x)]
    cts = [model.encrypt(keys, img) for img in x]
    env = {"OMP_NUM_THREADS": "2", "GRAVEL_MAX_SESSION_ITEMS": str(args.batch),
           "GRAVEL_HEADER_TIMEOUT_S": "3", "GRAVEL_BODY_TIMEOUT_S": "3"}
    server = ServiceProcess(work / "data", ADMIN, env=env).start()
    url = server.url
    p = Probe()
    acknowledged_sessions: list[tuple[str, dict]] = []
    acknowledged_jobs: dict[str, tuple[dict, list[int]]] = {}
    report: dict = {}

    def open_session() -> tuple[str, dict]:
        r = p.http("POST", f"{url}/v1/models/{manifest.name}/sessions", content=good,
                   headers={"Content-Type": OCTETS})
        assert r.status_code == 201, r.text
        sid, token = r.json()["session"], r.json()["token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": OCTETS}
        acknowledged_sessions.append((sid, headers))
        return sid, headers

    def items_run() -> int:
        text = httpx.get(url + "/metrics").text
        return int(float(re.search(r"^gravel_inference_seconds_count (\S+)$", text, re.MULTILINE).group(1)))

    def idle() -> None:
        while httpx.get(url + "/v1/ready").json()["queue_depth"]:
            time.sleep(0.05)

    try:
        # -- 1. SIGKILL while a deploy is processed ---------------------------------------------
        p.case = "SIGKILL during deploy"
        admin = Client(url, token=ADMIN, cache_dir=work / "admin-cache")
        threading.Thread(target=lambda: _quietly(admin.deploy, manifest.root), daemon=True).start()
        while not any(d.is_dir() for d in (server.data_dir / "tmp").iterdir()):
            time.sleep(0.01)
        server.kill()
        server.start()
        report["restart_after_deploy_kill"] = "up"
        p.check_up(url)
        admin.deploy(manifest.root)
        p.record(201, "deploy")

        # -- 2. hostile archives and manifests ---------------------------------------------------
        p.case = "hostile deploys"
        admin_h = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-tar"}
        plain = tar_of(files)
        bad_archives = [gzip.compress(plain), plain[: len(plain) // 2], b"\0" * 2048,
                        tar_of(files, pax={"comment": "x" * MiB}),
                        tar_of(dict(files, **{MANIFEST: files[MANIFEST] + b" " * (2 * MiB)}))]
        sparse_dir = work / "sparse" / "m.gravel"
        sparse_dir.mkdir(parents=True)
        for n, b in files.items():
            (sparse_dir / n).write_bytes(b)
        os.truncate(sparse_dir / "weights.npz", 1 << 30)
        for fmt in ("gnu", "posix"):
            out = work / f"sparse-{fmt}.tar"
            subprocess.run(["tar", "-S", f"--format={fmt}", "-cf", str(out), "-C", str(sparse_dir.parent),
                            "m.gravel"], check=True)
            bad_archives.append(out.read_bytes())
        m = json.loads(files[MANIFEST])
        for change in (lambda d: d.pop("model"), lambda d: d["model"].update(name=7),
                       lambda d: d["input"].update(bits="x"), lambda d: d.pop("stats"),
                       lambda d: d["plan"][0].update(shards=-1), lambda d: d.update(model=[[[[[]]]]] * 2)):
            bad = json.loads(files[MANIFEST])
            change(bad)
            bad_archives.append(tar_of(dict(files, **{MANIFEST: json.dumps(bad).encode()})))
        bad_archives.append(tar_of(dict(files, **{MANIFEST: b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}"})))
        refused = 0
        for body in bad_archives:
            r = p.http("POST", f"{url}/v1/models", content=body, headers=admin_h)
            refused += r.status_code in (400, 413) and str(server.data_dir) not in r.text
            p.http("GET", f"{url}/v1/models")
        report["hostile_deploys_refused"] = f"{refused}/{len(bad_archives)}"
        assert m["model"]["name"] == manifest.name
        p.check_up(url)

        # -- 3. key uploads: declared size, header, oversized (RSS), racing for slots ----------
        p.case = "key uploads"
        keys_url = f"{url}/v1/models/{manifest.name}/sessions"
        head = (f"POST /v1/models/{manifest.name}/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTETS}\r\n"
                f"Content-Length: {900 * MiB}\r\n\r\n").encode()
        t0 = time.perf_counter()
        report["declared_900MB_keys_status"] = p.raw(url, head)
        report["declared_900MB_keys_answer_s"] = round(time.perf_counter() - t0, 3)
        secret = frame(Kind.SECRET_KEYS, model.digest, b"x" * 64)
        head = head.replace(str(900 * MiB).encode(), str(len(good)).encode())
        report["secret_key_header_status"] = p.raw(url, head, secret)
        sessions = [open_session() for _ in range(2)]
        p.check_up(url)

        p.case = "oversized key uploads"
        size = 900 * MiB

        def oversized(out: list) -> None:
            def body():
                yield good[:38]
                chunk = b"\1" * MiB
                for _ in range(size // MiB):
                    yield chunk

            try:
                r = httpx.post(keys_url, content=body(), headers={"Content-Type": OCTETS}, timeout=300)
                out.append(p.record(r.status_code, "oversized keys"))
            except httpx.HTTPError:  # the server answered early and closed while we were sending
                out.append(0)

        pid = server.proc.pid
        base, _ = rss(pid)
        reset_peak(pid)
        answers: list = []
        threads = [threading.Thread(target=oversized, args=(answers,)) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rise = rss(pid)[1] - base
        report["oversized_key_uploads"] = {"count": 3, "size_bytes": size, "answers": sorted(answers),
                                           "peak_rss_rise_bytes": rise,
                                           "peak_rss_rise_per_upload_over_size": round(rise / 3 / size, 4)}
        base, _ = rss(pid)
        reset_peak(pid)
        sessions.append(open_session())
        report["valid_key_upload_peak_rss_rise_over_size"] = round((rss(pid)[1] - base) / len(good), 3)
        p.check_up(url)

        p.case = "concurrent key loads"
        answers = []

        def upload() -> None:
            r = p.http("POST", keys_url, content=good, headers={"Content-Type": OCTETS})
            answers.append(r.status_code)
            if r.status_code == 201:
                acknowledged_sessions.append((r.json()["session"], {
                    "Authorization": f"Bearer {r.json()['token']}", "Content-Type": OCTETS}))

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        report["four_concurrent_key_uploads"] = dict(collections.Counter(answers))
        p.check_up(url)

        # -- 4. slow clients ----------------------------------------------------------------------
        p.case = "slow clients"
        host, port = url.split("//")[1].split(":")
        slow = []
        for _ in range(300):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        t0 = time.perf_counter()
        health = [p.http("GET", url + "/v1/health", timeout=10).status_code for _ in range(10)]
        report["health_with_300_slow_connections"] = f"{health.count(200)}/10 in {time.perf_counter() - t0:.2f} s"
        for s in slow:
            s.close()
        sid, hdr = sessions[0]
        head = (f"POST /v1/sessions/{sid}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTETS}\r\n"
                f"Authorization: {hdr['Authorization']}\r\nContent-Length: {len(cts[0])}\r\n\r\n").encode()
        report["slow_body_status"] = p.raw(url, head, cts[0][:100])
        p.check_up(url)

        # -- 5. wrong-typed input, quota ---------------------------------------------------------
        p.case = "inputs"
        client = model._client
        client.keys = keys._keys
        second = manifest.plan[1]  # a ciphertext encrypted for the second stage, not the input
        made = client.encrypt(np.zeros(16, dtype=np.int64), function_name=shard_function(second, 0))
        made = made[0] if isinstance(made, tuple) else made
        wrong = frame(Kind.INPUT_CIPHERTEXT, model.digest, made.serialize())
        report["wrong_typed_job_status"] = p.http("POST", f"{url}/v1/sessions/{sid}/jobs", content=wrong,
                                                  headers=hdr).status_code
        batch = pack_batch(cts[: args.batch])
        r = p.http("POST", f"{url}/v1/sessions/{sid}/jobs", content=batch, headers=hdr)
        over = p.http("POST", f"{url}/v1/sessions/{sid}/jobs", content=pack_batch(cts[:2]), headers=hdr)
        report["over_quota_status"] = over.status_code
        p.http("DELETE", f"{url}/v1/jobs/{r.json()['job']}", headers=hdr)
        idle()
        p.check_up(url)

        # -- 6. a dropped /infer -----------------------------------------------------------------
        p.case = "dropped infer"
        before = items_run()
        try:
            httpx.post(f"{url}/v1/sessions/{sid}/infer", content=batch, headers=hdr,
                       timeout=httpx.Timeout(60, read=1.0))
        except httpx.ReadTimeout:
            pass
        time.sleep(1.0)
        idle()
        report["dropped_infer_items_run"] = f"{items_run() - before}/{args.batch}"
        p.check_up(url)

        # -- 7. 16 clients while a large batch is cancelled ----------------------------------------
        p.case = "concurrent clients"
        big_sid, big_hdr = sessions[1]
        clients = [open_session() for _ in range(args.clients)]
        before = items_run()
        r = p.http("POST", f"{url}/v1/sessions/{big_sid}/jobs", content=batch, headers=big_hdr)
        big_job = r.json()["job"]
        results: dict[int, list[int]] = {}
        latencies: list[float] = []

        def client_loop(c: int) -> None:
            c_sid, c_hdr = clients[c]
            got = []
            for k in range(args.per_client):
                i = c * args.per_client + k
                t = time.perf_counter()
                r = p.http("POST", f"{url}/v1/sessions/{c_sid}/infer", content=cts[i], headers=c_hdr)
                latencies.append(time.perf_counter() - t)
                got.append(model.predict(keys, r.content) if r.status_code == 200 else -1)
            results[c] = got

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        time.sleep(1.0)
        p.http("DELETE", f"{url}/v1/jobs/{big_job}", headers=big_hdr)
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        idle()
        preds = [results[c][k] for c in range(args.clients) for k in range(args.per_client)]
        n = args.clients * args.per_client
        report["concurrent_clients"] = {
            "clients": args.clients, "correct": f"{sum(a == b for a, b in zip(preds, clear[:n]))}/{n}",
            "wall_s": round(wall, 1), "median_latency_s": round(float(np.median(latencies)), 2),
            "max_latency_s": round(max(latencies), 2),
            "cancelled_batch_items_run": f"{items_run() - before - n}/{args.batch}"}
        p.check_up(url)

        # -- 8. SIGKILL during acknowledged jobs: nothing lost -----------------------------------------
        p.case = "SIGKILL during jobs"
        for k in range(3):
            c_sid, c_hdr = clients[k]
            items = list(range(4 * k, 4 * k + 4))
            r = p.http("POST", f"{url}/v1/sessions/{c_sid}/jobs", content=pack_batch([cts[i] for i in items]),
                       headers=c_hdr)
            acknowledged_jobs[r.json()["job"]] = (c_hdr, [clear[i] for i in items])
        first_job, (first_hdr, _) = next(iter(acknowledged_jobs.items()))
        while httpx.get(f"{url}/v1/jobs/{first_job}", headers=first_hdr).json()["status"] != "running":
            time.sleep(0.05)
        server.kill()
        server.start()
        p.check_up(url)
        lost = 0
        for sid_, hdr_ in acknowledged_sessions:
            lost += p.http("GET", f"{url}/v1/sessions/{sid_}", headers=hdr_).status_code != 200
        for job, (hdr_, want) in acknowledged_jobs.items():
            while p.http("GET", f"{url}/v1/jobs/{job}", headers=hdr_).json()["status"] in ("queued", "running"):
                time.sleep(0.2)
            r = p.http("GET", f"{url}/v1/jobs/{job}/result", headers=hdr_)
            got = [model.predict(keys, c) for c in unpack_batch(r.content)] if r.status_code == 200 else []
            lost += got != want
        report["acknowledged"] = {"sessions": len(acknowledged_sessions), "jobs": len(acknowledged_jobs),
                                  "lost": lost}
    finally:
        server.stop()

    # -- 9. a full disk (own server on a small tmpfs) ----------------------------------------------------
    if not args.no_full_disk and shutil.which("unshare"):
        p.case = "full disk"
        report["full_disk"] = _full_disk(p, work, manifest, good, model, keys, cts, clear)

    report.update({
        "server_errors_5xx": len(p.server_errors),
        "deliberate_503": p.statuses[503], "deliberate_507": p.statuses[507],
        "statuses": {str(k): v for k, v in sorted(p.statuses.items())},
        "server_up_after_each_case": not p.down_after,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    })
    if p.server_errors:
        report["first_server_errors"] = p.server_errors[:5]
    if p.down_after:
        report["down_after"] = p.down_after
    print(json.dumps(report))


def _full_disk(p: Probe, work: Path, manifest, good: bytes, model, keys, cts, clear) -> dict:
    from gravel.protocol import pack_batch
    from gravel.service.process import ServiceProcess

    data = work / "tmpfs-data"
    data.mkdir()
    launcher = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                'mount -t tmpfs -o size=256m tmpfs "$0" && exec "$@"', str(data)]
    server = ServiceProcess(data, ADMIN, env={"OMP_NUM_THREADS": "2"}, launcher=launcher)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - no user namespaces here: reported, not fatal
        return {"skipped": f"could not start a server on a tmpfs: {exc}"[:200]}
    url = server.url
    out: dict = {}
    try:
        from gravel.client import Client

        Client(url, token=ADMIN, cache_dir=work / "disk-cache").deploy(manifest.root)
        r = p.http("POST", f"{url}/v1/models/{manifest.name}/sessions", content=good,
                   headers={"Content-Type": OCTETS})
        hdr = {"Authorization": f"Bearer {r.json()['token']}", "Content-Type": OCTETS}
        sid = r.json()["session"]
        first = p.http("POST", f"{url}/v1/sessions/{sid}/jobs", content=cts[0], headers=hdr).json()["job"]
        while p.http("GET", f"{url}/v1/jobs/{first}", headers=hdr).json()["status"] != "done":
            time.sleep(0.05)
        running = p.http("POST", f"{url}/v1/sessions/{sid}/jobs", content=pack_batch(cts[:8]),
                         headers=hdr).json()["job"]
        filler = os.path.join(f"/proc/{server.proc.pid}/root", str(data).lstrip("/"), "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (MiB, 4096):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        while (st := p.http("GET", f"{url}/v1/jobs/{running}", headers=hdr).json())["status"] in (
                "queued", "running"):
            time.sleep(0.1)
        out["job_when_result_cannot_be_stored"] = st["status"]
        out["new_key_upload"] = p.http("POST", f"{url}/v1/models/{manifest.name}/sessions", content=good,
                                       headers={"Content-Type": OCTETS}).status_code
        out["new_job"] = p.http("POST", f"{url}/v1/sessions/{sid}/jobs", content=cts[1], headers=hdr).status_code
        r = p.http("GET", f"{url}/v1/jobs/{first}/result", headers=hdr)
        out["read_stored_result"] = r.status_code
        os.unlink(filler)
        r = p.http("POST", f"{url}/v1/sessions/{sid}/infer", content=cts[2], headers=hdr)
        out["after_space_freed_correct"] = r.status_code == 200 and model.predict(keys, r.content) == clear[2]
        p.check_up(url)
    finally:
        server.stop()
    return out


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - the server is killed under this call on purpose
        pass


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
