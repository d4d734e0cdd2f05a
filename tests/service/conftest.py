"""A real `gravel serve` (uvicorn on 127.0.0.1, SQLite in a temp dir) in a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from gravel.service.process import ServiceProcess

ADMIN = "test-admin-token"


class ServerProcess(ServiceProcess):
    """The service under test, with the admin token the tests use."""

    def __init__(self, data_dir: Path, executor: str = "local", env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, ADMIN, executor, {"OMP_NUM_THREADS": "2", **(env or {})})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("svc") / "data",
                        env={"GRAVEL_MAX_INPUT_BYTES": str(1 << 20)}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
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
