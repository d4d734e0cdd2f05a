"""The SDK against a real server: `Client` and `AsyncClient` drive one core, so they offer
the same methods, share keys and sessions, and fail with the same errors."""

from __future__ import annotations

import asyncio
import http.server
import inspect
import socket
import threading

import numpy as np
import pytest

from gravel.client import AsyncClient, AsyncSession, Client, Session
from gravel.errors import InputError, ServerAnsweredError, ServerUnreachableError, ServiceError
from gravel.service.process import free_port

from .conftest import ADMIN

# httpx names an async client's close `aclose`; AsyncClient keeps that name beside `close`.
ASYNC_ONLY = {"aclose"}


def _public(cls: type) -> dict[str, object]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


@pytest.mark.parametrize(("sync", "asyn"), [(Client, AsyncClient), (Session, AsyncSession)])
def test_async_sdk_has_the_sync_methods_as_coroutines(sync, asyn):
    sync_methods, async_methods = _public(sync), _public(asyn)
    assert set(async_methods) - ASYNC_ONLY == set(sync_methods)
    assert {"deploy", "delete_model", "health", "session"} <= set(_public(Client))
    assert {"infer", "predict_many", "submit", "status", "result", "predict_batch"} <= set(_public(Session))
    for name, method in sync_methods.items():
        assert not inspect.iscoroutinefunction(method), name
        assert inspect.iscoroutinefunction(async_methods[name]), name
        ps, pa = inspect.signature(method).parameters, inspect.signature(async_methods[name]).parameters
        assert [(p.name, p.default) for p in ps.values()] == [(p.name, p.default) for p in pa.values()], name
    assert inspect.signature(sync.__init__) == inspect.signature(asyn.__init__)


def test_sync_and_async_clients_share_keys_sessions_and_answers(sdk_server, service_artifact, digits,
                                                                 clear_predictions, tmp_path):
    x = digits.x_test[:2]
    want = clear_predictions(x)
    cache = tmp_path / "cache"
    seen: list[dict] = []

    async def async_part():
        async with AsyncClient(sdk_server.url, token=ADMIN, cache_dir=cache, progress=True) as ac:
            info = await ac.deploy(service_artifact)  # streamed tar upload
            assert info["name"] == "digits" and (await ac.health())["status"] == "ok"
            assert [m["name"] for m in await ac.models()] == ["digits"]
            assert (await ac.model("digits"))["digest"] == info["digest"]
            s = await ac.session("digits")  # key generation, streamed evaluation-key upload
            singles = list(await asyncio.gather(*(s.predict(img) for img in x)))
            out = await s.infer(await s.encrypt(x[0]))
            assert s.model.predict(s.keys, out) == want[0]
            many = await s.predict_many(x)
            job = await s.submit(x)
            assert (await s.status(job))["status"] in ("queued", "running", "done")
            from_job = [int(np.argmax(v)) for v in await s.result(job, poll_s=0.05, on_progress=seen.append)]
            assert await s.predict_batch(x[1:], poll_s=0.05) == want[1:]
            return s.id, await s.scores(x[1]), [singles, many, from_job]

    sid, async_scores, answers = asyncio.run(async_part())
    assert answers == [want] * 3
    assert all({"status", "done", "items"} <= st.keys() for st in seen)

    with Client(sdk_server.url, token=ADMIN, cache_dir=cache) as c:
        assert c.deploy(service_artifact)["digest"] == c.model("digits")["digest"]  # idempotent
        s = c.session("digits")
        assert s.id == sid  # the async client's cached session and keys: nothing uploaded again
        assert np.array_equal(s.scores(x[1]), async_scores)
        with pytest.raises(InputError, match="at least one"):
            s.predict_many([])
        s.close()
        # The cached session is gone on the server: the 404 is thrown into the session flow,
        # which forgets it and uploads the cached keys' evaluation keys for a new one.
        fresh = c.session("digits")
        assert fresh.id != sid and c.session("digits").id == fresh.id
        assert c.session("digits", reuse=False).id not in (sid, fresh.id)


class _NotGravel(http.server.BaseHTTPRequestHandler):
    """A plain HTTP server that is no Gravel server: a proxy's error page, a text answer."""

    def do_GET(self) -> None:
        status, body, ctype = ((200, b"hello", "text/plain") if self.path == "/v1/models"
                               else (502, b"<html><h1>502 Bad Gateway</h1></html>", "text/html"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_gravel():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotGravel)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        yield s.getsockname()[1]


def _errors(url: str, tmp_path, call, timeout_s: float = 30.0) -> tuple[Exception, Exception]:
    """The error `call(client)` raises with a Client and with an AsyncClient."""
    with Client(url, cache_dir=tmp_path, timeout_s=timeout_s) as c, pytest.raises(ServiceError) as sync_err:
        call(c)

    async def run():
        async with AsyncClient(url, cache_dir=tmp_path, timeout_s=timeout_s) as ac:
            with pytest.raises(ServiceError) as async_err:
                await call(ac)
        return async_err.value

    return sync_err.value, asyncio.run(run())


def test_errors_tell_an_unreachable_server_from_an_error_answer(sdk_server, not_gravel, silent_port, tmp_path):
    for err in _errors(f"http://127.0.0.1:{free_port()}", tmp_path, lambda c: c.models()):
        assert type(err) is ServerUnreachableError and err.status is None
        assert "cannot reach the Gravel server" in str(err)
    for err in _errors(f"http://127.0.0.1:{silent_port}", tmp_path, lambda c: c.health(), timeout_s=0.3):
        assert type(err) is ServerUnreachableError and "in time" in str(err)
    for err in _errors(sdk_server.url, tmp_path, lambda c: c.session("nope")):
        assert type(err) is ServerAnsweredError and err.status == 404
        assert "unknown model 'nope'" in str(err)
    for err in _errors(sdk_server.url, tmp_path, lambda c: c.delete_model("digits")):
        assert type(err) is ServerAnsweredError and err.status == 401  # no admin token
    for err in _errors(not_gravel, tmp_path, lambda c: c.health()):
        assert type(err) is ServerAnsweredError and err.status == 502 and "Bad Gateway" in str(err)
    for err in _errors(not_gravel, tmp_path, lambda c: c.models()):
        assert type(err) is ServerAnsweredError and err.status == 200
        assert "not a JSON object" in str(err) and "'hello'" in str(err)
