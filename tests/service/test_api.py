"""The service end to end: real uvicorn, real SQLite, real encryption on the digits model."""

from __future__ import annotations

import sqlite3

import httpx
import numpy as np
import pytest

from gravel.client import Client
from gravel.errors import ServiceError
from gravel.protocol import Kind, frame, pack_batch, unframe

from .conftest import ADMIN


@pytest.fixture(scope="module")
def two_sessions(server, deployed, tmp_path_factory):
    a = Client(server.url, cache_dir=tmp_path_factory.mktemp("cache-a")).session(deployed)
    b = Client(server.url, cache_dir=tmp_path_factory.mktemp("cache-b")).session(deployed)
    return a, b


def test_deploy_needs_the_admin_token(server, deployed, service_artifact, tmp_path):
    with Client(server.url, token="", cache_dir=tmp_path) as anon:
        with pytest.raises(ServiceError, match="admin token") as e:
            anon.deploy(service_artifact)
        assert e.value.status == 401
    with Client(server.url, token="wrong", cache_dir=tmp_path) as wrong:
        with pytest.raises(ServiceError, match="wrong admin token"):
            wrong.deploy(service_artifact)
        with pytest.raises(ServiceError) as e:
            wrong.delete_model(deployed)
        assert e.value.status == 403
    with Client(server.url, token=ADMIN, cache_dir=tmp_path) as admin:
        again = admin.deploy(service_artifact)  # same artifact: idempotent
    assert again["name"] == deployed and again["pbs_count"] > 0


def test_list_and_describe(server, deployed):
    models = httpx.get(server.url + "/v1/models").json()["models"]
    assert [m["name"] for m in models] == [deployed]
    info = httpx.get(f"{server.url}/v1/models/{deployed}").json()
    assert info["input_shape"] == [1, 8, 8] and info["classes"] == 10
    r = httpx.get(f"{server.url}/v1/models/nope")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["detail"]


def test_two_sessions_predict_what_the_clear_model_predicts(two_sessions, digits, expected):
    a, b = two_sessions
    assert a.id != b.id
    x = digits.x_test[:3]
    assert [a.predict(img) for img in x] == expected(x)
    assert b.predict_batch(x) == expected(x)  # a job
    assert b.predict_many(x) == expected(x)  # one waiting request


def test_pil_image_and_numpy_uint8(two_sessions, digits, expected):
    from PIL import Image

    a, _ = two_sessions
    img = (digits.x_test[5, 0] * 255).round().astype(np.uint8)
    assert a.predict(Image.fromarray(img)) == a.predict(img) == expected(img[None, None] / 255.0)[0]


def test_a_session_token_reaches_only_its_session(server, two_sessions, digits):
    a, b = two_sessions
    r = httpx.get(f"{server.url}/v1/sessions/{b.id}", headers={"Authorization": f"Bearer {a.token}"})
    assert r.status_code == 403
    ct = a.encrypt(digits.x_test[0])
    r = httpx.post(f"{server.url}/v1/sessions/{b.id}/infer", content=ct,
                   headers={"Authorization": f"Bearer {a.token}", "Content-Type": "application/octet-stream"})
    assert r.status_code == 403
    job = b.submit(digits.x_test[:1])
    assert httpx.get(f"{server.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {a.token}"}).status_code == 403
    assert httpx.get(f"{server.url}/v1/jobs/{job}/result").status_code == 401
    assert len(b.result(job)) == 1
    # A session token is not an admin token.
    r = httpx.delete(f"{server.url}/v1/models/digits", headers={"Authorization": f"Bearer {a.token}"})
    assert r.status_code == 403


def _post(server, path, body, token=None, ctype="application/octet-stream"):
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60)


def test_bad_keys_get_a_4xx_that_names_the_problem(server, deployed, two_sessions):
    a, _ = two_sessions
    path = f"/v1/models/{deployed}/sessions"
    good = a.keys.evaluation_keys()
    secret = frame(Kind.SECRET_KEYS, a.model.digest, a.keys._keys.serialize())
    cases = {
        "SECRET key": secret,
        "cut short": good[: len(good) // 2],
        "another model": frame(Kind.EVALUATION_KEYS, bytes(32), unframe(good, Kind.EVALUATION_KEYS, a.model.digest)),
        "not a Gravel evaluation keys blob": b"hello" * 100,
        "expected evaluation keys, got input ciphertext": a.encrypt(np.zeros((8, 8))),
    }
    for message, body in cases.items():
        # Streamed without a length: the header is checked as soon as it arrives.
        r = _post(server, path, iter([body]))
        assert r.status_code == 400, (message, r.text)
        assert message.lower() in r.json()["detail"].lower(), (message, r.json())
        # With a length: a body that cannot be this model's keys is refused before it is read.
        r = _post(server, path, body)
        if len(body) != len(good):
            assert r.status_code == (413 if len(body) > len(good) else 400), (message, r.text)
            assert f"exactly {len(good)} bytes" in r.json()["detail"], r.json()
        else:
            assert r.status_code == 400 and message in r.json()["detail"], r.json()
    r = _post(server, path, good, ctype="application/json")
    assert r.status_code == 415 and "application/octet-stream" in r.json()["detail"]
    assert _post(server, "/v1/models/nope/sessions", good).status_code == 404


def test_bad_ciphertexts_and_limits(server, two_sessions, digits):
    a, b = two_sessions
    path = f"/v1/sessions/{a.id}/infer"
    ct = a.encrypt(digits.x_test[0])
    r = _post(server, path, ct[:60], a.token)
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    r = _post(server, path, ct[:38] + b"\xff" * (len(ct) - 38), a.token)
    assert r.status_code == 400 and "corrupt or truncated" in r.json()["detail"]
    r = _post(server, path, a.keys.evaluation_keys()[:1000], a.token)
    assert r.status_code == 400 and "expected input ciphertext, got evaluation keys" in r.json()["detail"]
    r = _post(server, path, frame(Kind.SECRET_KEYS, a.model.digest, b"x" * 100), a.token)
    assert r.status_code == 400 and "SECRET" in r.json()["detail"]
    r = _post(server, path, b"", a.token)
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    # Over the input limit (a full quota of this model's inputs, under the server's 1 MiB): declared,
    # and streamed without a length.
    assert _post(server, path, b"\0" * (2 << 20), a.token).status_code == 413
    streamed = httpx.post(server.url + path, content=iter([ct] + [b"\0" * (1 << 19)] * 4),
                          headers={"Authorization": f"Bearer {a.token}", "Content-Type": "application/octet-stream"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
    r = _post(server, f"/v1/sessions/{a.id}/jobs", pack_batch([ct, ct[:50]]), a.token)
    assert r.status_code == 400 and "item 1" in r.json()["detail"]
    r = _post(server, f"/v1/sessions/{a.id}/jobs", b"GRVB\0\0\0\2" + b"\0" * 9, a.token)
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    assert _post(server, "/v1/sessions/s_nope/infer", ct, a.token).status_code == 404
    assert _post(server, path, ct).status_code == 401
    # None of that damaged anything: both sessions still compute correctly.
    assert a.predict(digits.x_test[0]) == b.predict(digits.x_test[0])


def test_jobs_report_progress_and_keep_results_until_fetched(server, two_sessions, digits, expected):
    a, _ = two_sessions
    job = a.submit(digits.x_test[:3])
    seen = []
    scores = a.result(job, poll_s=0.05, on_progress=seen.append)
    assert [int(np.argmax(s)) for s in scores] == expected(digits.x_test[:3])
    assert seen and seen[0]["items"] == 3 and all(0.0 <= s["progress"] <= 1.0 for s in seen)
    assert httpx.get(f"{server.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {a.token}"}).status_code == 404
    early = a.submit(digits.x_test[:2])
    r = httpx.get(f"{server.url}/v1/jobs/{early}/result", headers={"Authorization": f"Bearer {a.token}"})
    assert r.status_code in (200, 409)
    assert len(a.result(early)) == 2


def test_health_ready_metrics(server, two_sessions):
    assert httpx.get(server.url + "/v1/health").json()["status"] == "ok"
    ready = httpx.get(server.url + "/v1/ready").json()
    assert ready["ready"] and ready["models"] == 1 and ready["sessions"] >= 2
    text = httpx.get(server.url + "/metrics").text
    for name in ("gravel_requests_total", "gravel_request_seconds_bucket", "gravel_request_bytes_total",
                 "gravel_queue_depth", "gravel_inference_seconds_count", "gravel_sessions"):
        assert name in text, name
    assert 'route="/v1/sessions/{sid}/infer"' in text


def test_store_keeps_token_hashes_not_tokens(server, two_sessions):
    a, b = two_sessions
    db = sqlite3.connect(server.data_dir / "gravel.db")
    dump = "\n".join(db.iterdump())
    db.close()
    assert a.token not in dump and b.token not in dump and ADMIN not in dump


def test_restart_keeps_models_sessions_and_results(server, deployed, two_sessions, digits, expected):
    a, b = two_sessions
    job = a.submit(digits.x_test[6:8])
    while a.status(job)["status"] != "done":
        pass
    server.restart()
    # The same session objects and tokens go on working: keys, sessions and the result were stored.
    assert [int(np.argmax(s)) for s in a.result(job)] == expected(digits.x_test[6:8])
    assert a.predict(digits.x_test[8]) == expected(digits.x_test[8:9])[0]
    # A returning client (same cache directory) finds its session instead of uploading keys again.
    with Client(server.url, cache_dir=b.client.cache_dir) as returning:
        again = returning.session(deployed)
        assert again.id == b.id
        assert again.predict(digits.x_test[9]) == expected(digits.x_test[9:10])[0]
