"""Issue 10, items 2, 7, 8 and 9 against the shared real server: bodies refused before they
are read, key loads limited, the key cache bounded by bytes, slow headers and bodies cut off,
wrong-typed inputs refused at submission, and the server's own faults answered 500 with an id
that its log explains."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from gravel.protocol import Kind, frame

from .conftest import OCTETS, SHARED_ENV, open_session, raw_request


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def _tmp_files(server) -> list:
    return list((server.data_dir / "tmp").iterdir())


def test_key_upload_refused_on_its_declared_length_before_the_body(server, deployed, service_keys):
    good = service_keys[2]
    # 900 MB announced (under the 1 GiB server limit), not a byte sent: answered at once.
    head = (f"POST /v1/models/{deployed}/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTETS}\r\n"
            f"Content-Length: {900 << 20}\r\n\r\n").encode()
    answer, seconds = raw_request(server.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    # Answered without a byte of body: a server that waited for it would answer 408 after 2 s.
    assert f"exactly {len(good)} bytes".encode() in answer, (answer[:300], seconds)
    # Streamed without a length, the same body is cut off at the model's key size.
    r = httpx.post(f"{server.url}/v1/models/{deployed}/sessions", headers={"Content-Type": OCTETS},
                   content=iter([good, b"\0" * (1 << 20)]), timeout=60)
    assert r.status_code == 413 and f"({len(good)} bytes)" in r.json()["detail"]
    assert not _tmp_files(server)


def test_key_header_is_checked_as_it_streams_in(server, deployed, service_keys):
    model, _, good = service_keys
    secret_head = frame(Kind.SECRET_KEYS, model.digest, b"x")[:38]
    head = (f"POST /v1/models/{deployed}/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTETS}\r\n"
            f"Content-Length: {len(good)}\r\n\r\n").encode()
    # The header and a little more, then nothing: the answer must not wait for the other 60 MB.
    answer, seconds = raw_request(server.url, head, [secret_head + b"\0" * 1000])
    assert answer.startswith(b"HTTP/1.1 400"), (answer[:300], seconds)  # not 408: no wait for the rest
    assert b"SECRET key set must never be sent" in answer


def test_key_loads_at_once_are_limited(server, deployed, service_keys):
    _, _, good = service_keys
    assert SHARED_ENV["GRAVEL_MAX_KEY_LOADS"] == "1"
    step = len(good) // 8 + 1
    answers = {}

    def slow_upload():  # 8 chunks, 0.3 s apart: holds the only key-load slot for ~2.5 s
        def body():
            for i in range(0, len(good), step):
                time.sleep(0.3)
                yield good[i : i + step]

        answers["slow"] = httpx.post(f"{server.url}/v1/models/{deployed}/sessions", content=body(),
                                     headers={"Content-Type": OCTETS}, timeout=60)

    t = threading.Thread(target=slow_upload)
    t.start()
    deadline = time.monotonic() + 30  # until the slow upload holds the slot and is being received
    while not any(p.name.startswith("upload-") for p in _tmp_files(server)) and time.monotonic() < deadline:
        time.sleep(0.01)
    busy = httpx.post(f"{server.url}/v1/models/{deployed}/sessions", content=good,
                      headers={"Content-Type": OCTETS}, timeout=60)
    t.join(60)
    assert busy.status_code == 503, busy.text
    assert int(busy.headers["Retry-After"]) > 0 and "retry" in busy.json()["detail"]
    assert answers["slow"].status_code == 201, answers["slow"].text
    open_session(server.url, deployed, good)  # the slot is free again


def test_key_cache_is_bounded_by_bytes(server, sessions, service_keys, digits):
    model, keys, good = service_keys
    budget = int(SHARED_ENV["GRAVEL_KEY_CACHE_BYTES"])
    assert 2 * len(good) <= budget < 3 * len(good)
    ct = model.encrypt(keys, digits.x_test[0])
    for sid, headers in sessions:  # three sessions' keys, room for two
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/infer", content=ct, headers=headers, timeout=120)
        assert r.status_code == 200 and model.predict(keys, r.content) >= 0
        assert _metric(server.url, "gravel_key_cache_bytes") <= budget
    assert _metric(server.url, "gravel_key_cache_sessions") == 2


def test_slow_bodies_get_408(server, sessions, service_keys, digits):
    model, keys, _ = service_keys
    sid, headers = sessions[0]
    ct = model.encrypt(keys, digits.x_test[0])
    head = (f"POST /v1/sessions/{sid}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {OCTETS}\r\n"
            f"Authorization: {headers['Authorization']}\r\nContent-Length: {len(ct)}\r\n\r\n").encode()
    answer, seconds = raw_request(server.url, head, [ct[:100]])  # then silence
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert seconds > 1.5  # after the 2 s body timeout, not before


def test_slow_headers_are_dropped_and_health_checks_get_through(server):
    host, port = server.url.split("//")[1].split(":")
    cap = int(SHARED_ENV["GRAVEL_MAX_CONNECTIONS"])
    slow = []
    for _ in range(2 * cap):  # twice the connection cap, each stuck in its headers
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    try:
        t0 = time.monotonic()
        for _ in range(5):
            assert httpx.get(server.url + "/v1/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 20
        time.sleep(float(SHARED_ENV["GRAVEL_HEADER_TIMEOUT_S"]) + 1.0)
        closed = 0
        for s in slow:
            s.settimeout(0.5)
            try:
                closed += s.recv(1024) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(slow)  # shed for newer connections, or timed out in their headers
    finally:
        for s in slow:
            s.close()


def _wrong_typed_ciphertext(model, keys) -> bytes:
    """A real ciphertext of this program, but the input of its second function (16 values),
    framed as a model input: right frame and digest, wrong type for the model's input."""
    client = model._client
    client.keys = keys._keys
    # stage1 (the output layer, no lookup) is not shardable: its only argument is the ciphertext
    value = client.encrypt(np.zeros(16, dtype=np.int64), function_name="stage1")
    value = value[0] if isinstance(value, tuple) else value
    return frame(Kind.INPUT_CIPHERTEXT, model.digest, value.serialize())


def test_wrong_typed_ciphertexts_are_refused_at_submission(server, sessions, service_keys):
    model, keys, _ = service_keys
    sid, headers = sessions[0]
    wrong = _wrong_typed_ciphertext(model, keys)
    for path in ("jobs", "infer"):
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/{path}", content=wrong, headers=headers, timeout=60)
        assert r.status_code == 400, (path, r.text)
        detail = r.json()["detail"]
        assert "exactly" in detail and "another function or model" in detail, detail
        assert "TransportValue" not in detail and "dimensions" not in detail


def test_a_server_fault_is_a_500_with_an_id_in_the_log(server, deployed, service_keys, digits):
    model, keys, good = service_keys
    sid, headers = open_session(server.url, deployed, good)  # new session: its keys are not loaded yet
    sha = hashlib.sha256(good).hexdigest()
    blob = server.data_dir / "blobs" / sha[:2] / sha
    saved = server.data_dir.parent / "keys-aside"
    shutil.move(blob, saved)  # storage damaged under the server: not the client's doing
    try:
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/infer", content=model.encrypt(keys, digits.x_test[0]),
                       headers=headers, timeout=120)
    finally:
        shutil.move(saved, blob)
    assert r.status_code == 500, r.text
    eid = re.search(r"error id (e_[0-9a-f]+)", r.json()["detail"]).group(1)
    assert "keys" not in r.json()["detail"] and str(server.data_dir) not in r.json()["detail"]
    log = server.log.read_text()
    assert f"error {eid} in job" in log and "FileNotFoundError" in log


@pytest.mark.parametrize("path", ["/v1/models/nope/sessions", "/v1/sessions/s_nope/infer"])
def test_client_faults_stay_4xx(server, path):
    r = httpx.post(server.url + path, content=b"x", headers={"Content-Type": OCTETS,
                                                             "Authorization": "Bearer nope"})
    assert r.status_code == 404
