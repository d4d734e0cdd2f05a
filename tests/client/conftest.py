"""A real `gravel serve` (uvicorn on 127.0.0.1, SQLite in a temp dir) for the SDK's tests,
one per module, with the digits model deployed by the tests themselves."""

from __future__ import annotations

import pytest

from gravel.service.process import ServiceProcess

ADMIN = "sdk-test-admin-token"


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory):
    srv = ServiceProcess(tmp_path_factory.mktemp("sdk-svc") / "data", ADMIN, "local",
                         {"OMP_NUM_THREADS": "2"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clear_predictions(service_artifact):
    """The clear quantized model's predictions, which encrypted ones must equal."""
    from gravel.compiler import load_graph
    from gravel.protocol import load_manifest

    graph = load_graph(load_manifest(service_artifact))
    return lambda images: [int(p) for p in graph.predict(images)]
