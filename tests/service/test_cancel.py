"""Issue 10, item 3, against the shared real server: a cancelled job stops, a dropped request
frees its slot, one session's batch does not hold up another session, and a session's queue
has a quota."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from gravel.protocol import pack_batch

from .conftest import SHARED_ENV

QUOTA = int(SHARED_ENV["GRAVEL_MAX_SESSION_ITEMS"])


@pytest.fixture(scope="module")
def pair(server, sessions, service_keys, digits):
    """Two sessions (keys loaded), a full quota of inputs for one, one input for the other."""
    model, keys, _ = service_keys
    a, b = sessions[:2]
    batch = pack_batch([model.encrypt(keys, x) for x in digits.x_test[:QUOTA]])
    one = model.encrypt(keys, digits.x_test[0])
    for sid, headers in (a, b):
        _infer(server, (sid, headers), one)
    return a, b, batch, one


def _status(server, job, headers):
    return httpx.get(f"{server.url}/v1/jobs/{job}", headers=headers)


def _infer(server, session, body) -> None:
    sid, headers = session
    r = httpx.post(f"{server.url}/v1/sessions/{sid}/infer", content=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text


def _items_run(server) -> int:
    """Encrypted inferences the engine has completed (the per-item histogram's count)."""
    text = httpx.get(server.url + "/metrics").text
    return int(float(re.search(r"^gravel_inference_seconds_count (\S+)$", text, re.MULTILINE).group(1)))


def _idle(server) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(server.url + "/v1/ready").json()["queue_depth"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_cancelled_batch_stops_and_does_not_hold_up_other_sessions(server, pair):
    (sid_a, ha), b, batch, one = pair
    _idle(server)
    before = _items_run(server)
    r = httpx.post(f"{server.url}/v1/sessions/{sid_a}/jobs", content=batch, headers=ha)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    while _status(server, job, ha).json()["status"] != "running":
        time.sleep(0.02)
    # B's request goes right after A's running item (one slot), not after A's whole batch (2: the
    # item running when B's request was read may have ended just before B's job was queued).
    _infer(server, b, one)
    done = _status(server, job, ha).json()["done"]
    assert done <= 2, done
    assert httpx.delete(f"{server.url}/v1/jobs/{job}", headers=ha).status_code == 204
    # Cancelled: gone, and A's quota is free at once...
    assert _status(server, job, ha).status_code == 404
    r = httpx.post(f"{server.url}/v1/sessions/{sid_a}/jobs", content=batch, headers=ha)
    assert r.status_code == 202, r.text
    assert httpx.delete(f"{server.url}/v1/jobs/{r.json()['job']}", headers=ha).status_code == 204
    # ...and of A's items only those started before the cancellation ran (at most the running
    # one after it), plus B's one and at most one of the second batch.
    _idle(server)
    assert _items_run(server) - before <= done + 1 + 1 + 1 < QUOTA


def test_a_session_queue_has_a_quota(server, pair, service_keys, digits):
    (sid_a, ha), _, batch, one = pair
    model, keys, _ = service_keys
    r = httpx.post(f"{server.url}/v1/sessions/{sid_a}/jobs", content=batch, headers=ha)
    assert r.status_code == 202
    job = r.json()["job"]
    # At most one of its items has started, so at least QUOTA - 1 are queued: two more overflow.
    two = pack_batch([one, model.encrypt(keys, digits.x_test[1])])
    for path in ("jobs", "infer"):
        over = httpx.post(f"{server.url}/v1/sessions/{sid_a}/{path}", content=two, headers=ha)
        assert over.status_code == 429, over.text
        assert int(over.headers["Retry-After"]) > 0 and f"may have {QUOTA}" in over.json()["detail"]
    assert httpx.delete(f"{server.url}/v1/jobs/{job}", headers=ha).status_code == 204


def test_a_dropped_request_frees_its_slot(server, pair):
    (sid_a, ha), b, batch, one = pair
    _idle(server)
    before = _items_run(server)
    failure = {}

    def impatient():
        try:
            httpx.post(f"{server.url}/v1/sessions/{sid_a}/infer", content=batch, headers=ha,
                       timeout=httpx.Timeout(60, read=1.0))
        except httpx.ReadTimeout as exc:  # the client gives up and closes its connection
            failure["error"] = exc

    t = threading.Thread(target=impatient)
    t.start()
    t.join(120)
    assert "error" in failure
    # The server notices within its poll interval and cancels the request's items.
    _idle(server)
    assert _items_run(server) - before < QUOTA - 1
    _infer(server, b, one)
    r = httpx.post(f"{server.url}/v1/sessions/{sid_a}/jobs", content=batch, headers=ha)
    assert r.status_code == 202, r.text
    assert httpx.delete(f"{server.url}/v1/jobs/{r.json()['job']}", headers=ha).status_code == 204
