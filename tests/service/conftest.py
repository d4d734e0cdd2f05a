"""A real `gravel serve` (uvicorn on 127.0.0.1, SQLite in a temp dir) in a subprocess.

One server is shared by every test that does not need a fresh one (its limits are set low so
the limit tests can reach them with small bodies); tests that kill, fill or reconfigure a
server start their own.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from gravel.service.process import ServiceProcess

ADMIN = "test-admin-token"
OCTETS = "application/octet-stream"
MiB = 1 << 20

# The shared server's limits (see ServiceConfig for what each one bounds).
SHARED_ENV = {
    "GRAVEL_MAX_INPUT_BYTES": str(1 * MiB),
    "GRAVEL_MAX_SESSION_ITEMS": "6",
    "GRAVEL_MAX_KEY_LOADS": "1",
    "GRAVEL_KEY_CACHE_BYTES": str(160 * MiB),  # two sessions of the digits model's 63 MB keys
    "GRAVEL_HEADER_TIMEOUT_S": "2",
    "GRAVEL_BODY_TIMEOUT_S": "2",
    "GRAVEL_MAX_CONNECTIONS": "24",
}


class ServerProcess(ServiceProcess):
    """The service under test, with the admin token the tests use."""

    def __init__(self, data_dir: Path, executor: str = "local", env: dict[str, str] | None = None,
                 launcher: list[str] | None = None) -> None:
        super().__init__(data_dir, ADMIN, executor, {"OMP_NUM_THREADS": "2", **(env or {})}, launcher=launcher)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("svc") / "data", env=SHARED_ENV).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def deployed(server, service_artifact):
    from gravel.client import Client

    with Client(server.url, token=ADMIN, cache_dir=server.data_dir.parent / "deploy-cache") as c:
        c.deploy(service_artifact)
    return "digits"


@pytest.fixture(scope="session")
def expected(digits, service_artifact):
    """The clear quantized model's predictions, which encrypted ones must equal."""
    from gravel.compiler import load_graph
    from gravel.protocol import load_manifest

    graph = load_graph(load_manifest(service_artifact))
    return lambda images: [int(p) for p in graph.predict(images)]


@pytest.fixture(scope="session")
def service_keys(service_artifact):
    """One key set for the service model, for tests that speak HTTP without the SDK (several
    sessions may upload the same evaluation keys: each gets its own id and token)."""
    from gravel.client import ClientModel

    model = ClientModel.load(service_artifact)
    keys = model.keygen()
    return model, keys, keys.evaluation_keys()


@pytest.fixture(scope="session")
def sessions(server, deployed, service_keys):
    """Three sessions on the shared server, opened once with the same keys: (id, headers)."""
    return [open_session(server.url, deployed, service_keys[2]) for _ in range(3)]


def open_session(url: str, model: str, keys: bytes) -> tuple[str, dict[str, str]]:
    """A session id and the headers that carry its token."""
    r = httpx.post(f"{url}/v1/models/{model}/sessions", content=keys, headers={"Content-Type": OCTETS},
                   timeout=120)
    assert r.status_code == 201, r.text
    body = r.json()
    return body["session"], {"Authorization": f"Bearer {body['token']}", "Content-Type": OCTETS}


def raw_request(url: str, head: bytes, body_parts: list[bytes] = (), pause_s: float = 0.0,
                timeout_s: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes on a socket (headers, then body parts with pauses); returns what the
    server answered before closing or the timeout, and how long the first byte took."""
    import time

    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        t0 = time.monotonic()
        sock.sendall(head)
        answer, first = b"", None
        for part in body_parts:
            time.sleep(pause_s)
            try:
                sock.sendall(part)
            except OSError:
                break
        sock.settimeout(timeout_s)
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            if first is None:
                first = time.monotonic() - t0
            answer += chunk
            if b"\r\n\r\n" in answer and _complete(answer):
                break
        return answer, first if first is not None else time.monotonic() - t0


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


# -- a CKKS model on its own server -------------------------------------------------------------
@pytest.fixture(scope="session")
def ckks_artifact(tmp_path_factory, digits):
    """The CKKS digits MLP 64-16-10 with x^2 (ring N=8192, depth 3); a small SIMD block keeps
    batches few ciphertexts."""
    from gravel.ckks.artifact import compile_ckks_model
    from gravel.ckks.compile import CkksOptions

    from ..ckks.conftest import train_digits_mlp

    model = train_digits_mlp(digits, "square")
    out = tmp_path_factory.mktemp("ckks-svc") / "sq.gravel"
    manifest = compile_ckks_model(model, digits.x_train[:300], out, digits.y_train[:300],
                                  CkksOptions(batch_block=256), name="sq")
    # the same network compiled with another packing: another model, with its own digest
    other = compile_ckks_model(model, digits.x_train[:300], out.with_name("other.gravel"), digits.y_train[:300],
                               CkksOptions(batch_block=512), name="other")
    return manifest, other


@pytest.fixture(scope="session")
def ckks_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("ckks-svc") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def ckks_deployed(ckks_server, ckks_artifact):
    from gravel.client import Client

    with Client(ckks_server.url, token=ADMIN, cache_dir=ckks_server.data_dir.parent / "deploy-cache") as c:
        info = c.deploy(ckks_artifact[0].root)
    return info
