"""Where the service's inferences run: in this process, or on a Ray cluster.

Both engines take a model's artifact directory, a session's evaluation keys (loaded lazily
from the store, so sessions survive a restart without being re-sent) and one framed input
ciphertext, and return one framed output ciphertext. `slots` is how many inferences the
service should run at once to keep the engine's CPUs busy.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Protocol

from gravel.errors import GravelError

__all__ = ["Engine", "LocalEngine", "RayEngine", "make_engine"]

Progress = Callable[[int, int], None]
KeysLoader = Callable[[], bytes]


class Engine(Protocol):
    slots: int
    description: str

    def infer(
        self, model: str, artifact: Path, session: str, keys: KeysLoader, ciphertext: bytes, progress: Progress
    ) -> bytes: ...

    def drop_session(self, session: str) -> None: ...

    def drop_model(self, model: str) -> None: ...

    def close(self) -> None: ...


class LocalEngine:
    """One inference at a time in this process; the backend's OpenMP threads use every core,
    so running two at once gains nothing and doubles memory."""

    description = "local (in-process)"

    def __init__(self, slots: int = 1, cached_sessions: int = 32) -> None:
        self.slots = slots
        self._models: dict[str, object] = {}
        self._keys: OrderedDict[str, object] = OrderedDict()
        self._cached = cached_sessions
        self._lock = threading.Lock()

    def _model(self, model: str, artifact: Path):
        from gravel.server import ServerModel

        with self._lock:
            if model not in self._models:
                self._models[model] = ServerModel.load(artifact)
            return self._models[model]

    def _session_keys(self, server, session: str, keys: KeysLoader):
        with self._lock:
            if session in self._keys:
                self._keys.move_to_end(session)
                return self._keys[session]
        loaded = server.load_evaluation_keys(keys())
        with self._lock:
            self._keys[session] = loaded
            while len(self._keys) > self._cached:
                self._keys.popitem(last=False)
        return loaded

    def infer(self, model, artifact, session, keys, ciphertext, progress) -> bytes:
        server = self._model(model, artifact)
        value = server.load_input(ciphertext)
        out, _ = server.run(self._session_keys(server, session, keys), value, progress=progress)
        return server.frame_output(out)

    def drop_session(self, session: str) -> None:
        with self._lock:
            self._keys.pop(session, None)

    def drop_model(self, model: str) -> None:
        with self._lock:
            self._models.pop(model, None)

    def close(self) -> None:
        pass


class RayEngine:
    """Each model's shards run on Ray actors (gravel.cluster); requests overlap on them.

    The actors of one model hold the cluster's CPUs. When another model is asked for and the
    cluster has no room, the executors of models with no inference in flight are shut down
    first (their actors restart on the next request for them, in seconds)."""

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        import ray

        from gravel.cluster.executor import ClusterError

        self.address = address
        self.workers = workers
        self._executors: OrderedDict[str, object] = OrderedDict()
        self._inflight: dict[str, int] = {}
        self._sessions: dict[tuple[str, str], str] = {}
        self._cond = threading.Condition()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}") from exc
        cpus = int(ray.cluster_resources().get("CPU", 0))
        self.slots = max(1, workers or cpus)
        where = f"Ray cluster at {address}" if address else "embedded Ray"
        self.description = f"{where}, {self.slots} worker slots"

    def _executor(self, model: str, artifact: Path):
        from gravel.cluster import RayExecutor
        from gravel.cluster.executor import ClusterError

        with self._cond:
            while True:
                if model in self._executors:
                    self._executors.move_to_end(model)
                    self._inflight[model] = self._inflight.get(model, 0) + 1
                    return self._executors[model]
                try:
                    ex = RayExecutor(artifact, workers=self.workers, address=self.address)
                except ClusterError:
                    idle = [m for m in self._executors if self._inflight.get(m, 0) == 0]
                    if not idle and not self._executors:
                        raise
                    for m in idle:
                        self._shutdown(m)
                    if not idle:
                        self._cond.wait(timeout=1.0)
                    continue
                self._executors[model] = ex
                self._inflight[model] = 1
                return ex

    def _shutdown(self, model: str) -> None:
        ex = self._executors.pop(model, None)
        if ex is not None:
            ex.shutdown()
        self._sessions = {k: v for k, v in self._sessions.items() if k[0] != model}

    def infer(self, model, artifact, session, keys, ciphertext, progress) -> bytes:
        ex = self._executor(model, artifact)
        try:
            with self._cond:
                handle = self._sessions.get((model, session))
            if handle is None:
                handle = ex.open_session(keys())
                with self._cond:
                    self._sessions[(model, session)] = handle
            out, _ = ex.infer(handle, ciphertext, progress=progress)
            return out
        finally:
            with self._cond:
                self._inflight[model] -= 1
                self._cond.notify_all()

    def drop_session(self, session: str) -> None:
        with self._cond:
            for key in [k for k in self._sessions if k[1] == session]:
                handle = self._sessions.pop(key)
                ex = self._executors.get(key[0])
                if ex is not None and handle not in self._sessions.values():
                    ex.close_session(handle)

    def drop_model(self, model: str) -> None:
        with self._cond:
            self._shutdown(model)

    def close(self) -> None:
        import ray

        with self._cond:
            for m in list(self._executors):
                self._shutdown(m)
        if self._owns_ray:  # an embedded Ray's processes must not outlive the service
            ray.shutdown()


def make_engine(kind: str, ray_address: str | None = None, workers: int | None = None) -> Engine:
    """`local`: in this process. `ray`: the Ray cluster at `ray_address` (or RAY_ADDRESS), else
    an embedded single-machine Ray."""
    if kind == "local":
        return LocalEngine()
    if kind == "ray":
        return RayEngine(ray_address or os.environ.get("RAY_ADDRESS") or None, workers)
    raise GravelError(f"unknown executor {kind!r}: use 'local' or 'ray'")
