"""A real `gravel serve` (uvicorn on 127.0.0.1, SQLite in a temp dir) in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ADMIN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gravel serve` on a free port; `restart()` keeps the data directory."""

    def __init__(self, data_dir: Path, executor: str = "local", env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.executor = executor
        self.env = {**os.environ, "GRAVEL_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "2", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "gravel.cli.main", "-q", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--executor", self.executor]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gravel serve exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gravel serve did not become ready:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, kill: bool = False) -> ServerProcess:
        self.kill() if kill else self.stop()
        return self.start()


@pytest.fixture(scope="session")
def service_artifact(tmp_path_factory, digits, digits_checkpoint):
    """The digits model with one shard per stage: one process runs it, so fewer backend calls."""
    from gravel.compiler import compile_model
    from gravel.harness.common import calib_images

    out = tmp_path_factory.mktemp("svc-art") / "digits.gravel"
    compile_model(digits_checkpoint, calib_images(digits, 200), out, max_shards=1)
    return out


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
