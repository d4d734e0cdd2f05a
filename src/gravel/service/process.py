"""`gravel serve` in a child process, for the demo, the benchmarks and the tests: the real
server on 127.0.0.1 with its own data directory, which can be stopped, killed and restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gravel.errors import ServiceError

__all__ = ["ServiceProcess", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`restart()` keeps the port and the data directory, as an operator's restart would.

    `launcher` is a command prefix the server runs under, e.g. `["prlimit", "--nofile=128", "--"]`
    for a low open-file limit; the server is then `exec`ed by it, so `proc.pid` is the server's."""

    def __init__(self, data_dir: Path, admin_token: str, executor: str = "local",
                 env: dict[str, str] | None = None, port: int | None = None,
                 launcher: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.executor = executor
        self.launcher = list(launcher or [])
        self.env = {**os.environ, "GRAVEL_ADMIN_TOKEN": admin_token, **(env or {})}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> ServiceProcess:
        import httpx

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*self.launcher, sys.executable, "-m", "gravel.cli.main", "-q", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--executor", self.executor]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"gravel serve exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/v1/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"gravel serve did not become ready in {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, kill: bool = False) -> ServiceProcess:
        self.kill() if kill else self.stop()
        return self.start()

    def __enter__(self) -> ServiceProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
