"""Where the service's inferences run: in this process, or on a Ray cluster.

Both engines take a model's artifact directory, a session's evaluation keys (loaded lazily
from the store, so sessions survive a restart without being re-sent) and one framed input
ciphertext, and return one framed output ciphertext. `slots` is how many inferences the
service should run at once to keep the engine's CPUs busy. `should_stop` is polled between
stages and shards (where the backend can be interrupted), so a cancelled job or a dropped
request frees its slot without waiting for the whole inference.

Evaluation keys are cached by bytes, not by count: one session's keys are tens to hundreds of
megabytes, so a count says nothing about memory.

CKKS models (gravel.service.ckks_runner): one image, or a batch of one SIMD group, runs in this
process on both engines (the Ray engine hands them to an in-process `LocalEngine` of its own,
its keys in that engine's cache); a batch of several groups on the Ray engine is spread over
Ray workers, whole groups each (gravel.cluster.ckks_executor), and runs in-process where the
cluster has no free CPUs for them.
`check_input` is the full check of a CKKS input against its session's keys, at submission.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Protocol

from gravel.errors import GravelError

__all__ = ["Engine", "KeyCache", "LocalEngine", "RayEngine", "make_engine"]

Progress = Callable[[int, int], None]
KeysLoader = Callable[[], bytes]
StopCheck = Callable[[], bool]


class Engine(Protocol):
    slots: int
    description: str
    key_cache: KeyCache

    def infer(
        self, model: str, artifact: Path, session: str, keys: KeysLoader, ciphertext: bytes, progress: Progress,
        should_stop: StopCheck | None = None,
    ) -> bytes: ...

    def check_input(self, model: str, artifact: Path, session: str, keys: KeysLoader, ciphertext: bytes) -> None: ...

    def drop_session(self, session: str) -> None: ...

    def drop_model(self, model: str) -> None: ...

    def close(self) -> None: ...


class KeyCache:
    """Loaded evaluation keys by session, least recently used first out, holding at most
    `budget` bytes (counted as the keys' serialized size, which is about what the deserialized
    keys occupy). Keys larger than the whole budget are used for their inference but not kept."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: object, size: int) -> list[tuple[Hashable, object]]:
        """Keep `value`; returns what was evicted to make room, for the caller to release
        (`(key, value)` itself when it is larger than the whole budget)."""
        with self._lock:
            evicted: list[tuple[Hashable, object]] = []
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.budget:
                return [(key, value)]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.budget:
                k, (v, n) = self._items.popitem(last=False)
                self.bytes -= n
                evicted.append((k, v))
            return evicted

    def pop_where(self, match: Callable[[Hashable], bool]) -> list[tuple[Hashable, object]]:
        with self._lock:
            gone = [(k, self._items.pop(k)) for k in [k for k in self._items if match(k)]]
            self.bytes -= sum(n for _, (_, n) in gone)
            return [(k, v) for k, (v, _) in gone]

    def items(self) -> list[tuple[Hashable, object]]:
        with self._lock:
            return [(k, v) for k, (v, _) in self._items.items()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class LocalEngine:
    """One inference at a time in this process; the backend's OpenMP threads use every core,
    so running two at once gains nothing and doubles memory."""

    description = "local (in-process)"

    def __init__(self, slots: int = 1, key_cache_bytes: int = 2 << 30) -> None:
        self.slots = slots
        self._models: dict[str, object] = {}
        self.key_cache = KeyCache(key_cache_bytes)
        self._lock = threading.Lock()

    def _model(self, model: str, artifact: Path):
        from gravel.protocol.manifest import artifact_backend
        from gravel.service.ckks_runner import CkksServerModel

        with self._lock:
            if model not in self._models:
                if artifact_backend(artifact) == "ckks":
                    self._models[model] = CkksServerModel.load(artifact)
                else:
                    from gravel.server import ServerModel

                    self._models[model] = ServerModel.load(artifact)
            return self._models[model]

    def check_input(self, model, artifact, session, keys, ciphertext) -> None:
        """A CKKS input checked against the session's keys (loaded into the cache); TFHE inputs
        are checked by the routes without keys."""
        server = self._model(model, artifact)
        if getattr(server, "backend", "concrete") == "ckks":
            server.check_input(self._session_keys(server, session, keys), ciphertext)

    def _session_keys(self, server, session: str, keys: KeysLoader):
        loaded = self.key_cache.get(session)
        if loaded is None:
            data = keys()
            loaded = server.load_evaluation_keys(data)
            self.key_cache.put(session, loaded, len(data))
        return loaded

    def infer(self, model, artifact, session, keys, ciphertext, progress, should_stop=None) -> bytes:
        server = self._model(model, artifact)
        value = server.load_input(ciphertext)
        out, _ = server.run(self._session_keys(server, session, keys), value, progress=progress,
                            should_stop=should_stop)
        return server.frame_output(out)

    def drop_session(self, session: str) -> None:
        self.key_cache.pop_where(lambda k: k == session)

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

    def __init__(self, address: str | None = None, workers: int | None = None,
                 key_cache_bytes: int = 2 << 30) -> None:
        import ray

        from gravel.cluster.executor import ClusterError

        self.address = address
        self.workers = workers
        self._executors: OrderedDict[str, object] = OrderedDict()
        self._inflight: dict[str, int] = {}
        # (model, session) -> the executor's session handle (keys in Ray's object store)
        self.key_cache = KeyCache(key_cache_bytes)
        self._cond = threading.Condition()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}") from exc
        cpus = int(ray.cluster_resources().get("CPU", 0))
        self.slots = max(1, workers or cpus)
        self._where = f"Ray cluster at {address}" if address else "embedded Ray"
        self.modes: dict[str, int] = {}  # how inferences ran: sharded / whole (the executor chooses)
        # CKKS models run in this process for now (see the module doc)
        self._inprocess = LocalEngine(self.slots, key_cache_bytes)
        self._backends: dict[str, str] = {}
        self._ckks: dict[str, object] = {}  # model -> CkksRayExecutor (None: no room on the cluster)
        self._ckks_busy: dict[str, int] = {}
        self._ckks_block: dict[str, int] = {}

    @property
    def description(self) -> str:
        """For /health/ready: where inferences run, and how the executors chose to run them."""
        ran = ", ".join(f"{mode} {n}" for mode, n in sorted(self.modes.items()))
        return f"{self._where}, {self.slots} worker slots" + (f"; inferences run {ran}" if ran else "")

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
                    # a service serves many requests: a worker per CPU, so that overlapping
                    # requests run whole side by side (the executor chooses per request)
                    ex = RayExecutor(artifact, workers=self.slots, address=self.address)
                except ClusterError:
                    # CKKS executors with no batch running give their CPUs back (made anew later)
                    for m in [m for m, e in self._ckks.items() if e is not None and not self._ckks_busy.get(m)]:
                        self._ckks.pop(m).shutdown()
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
        self.key_cache.pop_where(lambda k: k[0] == model)

    def _release(self, evicted: list) -> None:
        """Close evicted handles in their executor, unless another session shares them
        (identical keys give one handle)."""
        for (model, _), handle in evicted:
            ex = self._executors.get(model)
            shared = any(k[0] == model and v == handle for k, v in self.key_cache.items())
            if ex is not None and not shared:
                ex.close_session(handle)

    def _in_process(self, model: str, artifact: Path) -> bool:
        from gravel.protocol.manifest import artifact_backend

        with self._cond:
            if model not in self._backends:
                self._backends[model] = artifact_backend(artifact)
            return self._backends[model] == "ckks"

    def check_input(self, model, artifact, session, keys, ciphertext) -> None:
        if self._in_process(model, artifact):
            self._inprocess.check_input(model, artifact, session, keys, ciphertext)

    def _ckks_spread(self, model: str, artifact: Path, ciphertext: bytes):
        """The CKKS executor of a model for an input worth spreading (a batch of several
        groups), else None."""
        from gravel.ckks.server import input_header
        from gravel.cluster.ckks_executor import CkksRayExecutor
        from gravel.errors import ClusterError
        from gravel.protocol import load_manifest

        head = input_header(ciphertext)
        with self._cond:
            if model not in self._ckks_block:
                self._ckks_block[model] = int(load_manifest(artifact, role="server", backends=("ckks",))
                                              .data["packing"]["batch"]["block"])
            n, block = head.get("n"), self._ckks_block[model]
            if head.get("mode") != "batch" or not isinstance(n, int) or n <= block or self.slots < 2:
                return None
            if model not in self._ckks:
                try:
                    self._ckks[model] = CkksRayExecutor(artifact, workers=self.slots, address=self.address)
                except ClusterError:
                    self._ckks[model] = None
            ex = self._ckks[model]
            if ex is None:  # the cluster had no room for the workers: in-process
                return None
            self._ckks_busy[model] = self._ckks_busy.get(model, 0) + 1
            return ex

    def infer(self, model, artifact, session, keys, ciphertext, progress, should_stop=None) -> bytes:
        if self._in_process(model, artifact):
            ex = self._ckks_spread(model, artifact, ciphertext)
            if ex is not None:
                try:
                    out = ex.run(keys(), ciphertext)
                finally:
                    with self._cond:
                        self._ckks_busy[model] -= 1
                if progress is not None:
                    progress(1, 1)
                with self._cond:
                    self.modes["data-parallel (ckks)"] = self.modes.get("data-parallel (ckks)", 0) + 1
                return out
            out = self._inprocess.infer(model, artifact, session, keys, ciphertext, progress, should_stop)
            with self._cond:
                self.modes["in-process (ckks)"] = self.modes.get("in-process (ckks)", 0) + 1
            return out
        ex = self._executor(model, artifact)
        try:
            key = (model, session)
            handle, uncached = self.key_cache.get(key), []
            if handle is None:
                data = keys()
                size = len(data)
                handle = ex.open_session(data)
                del data
                with self._cond:
                    evicted = self.key_cache.put(key, handle, size)
                    uncached = [e for e in evicted if e[0] == key]  # larger than the whole cache
                    self._release([e for e in evicted if e[0] != key])
            try:
                out, trace = ex.infer(handle, ciphertext, progress=progress, should_stop=should_stop)
                with self._cond:
                    self.modes[trace.mode] = self.modes.get(trace.mode, 0) + 1
            finally:
                if uncached:
                    with self._cond:
                        self._release(uncached)
            return out
        finally:
            with self._cond:
                self._inflight[model] -= 1
                self._cond.notify_all()

    def drop_session(self, session: str) -> None:
        self._inprocess.drop_session(session)
        with self._cond:
            self._release(self.key_cache.pop_where(lambda k: k[1] == session))

    def drop_model(self, model: str) -> None:
        self._inprocess.drop_model(model)
        with self._cond:
            self._backends.pop(model, None)
            self._shutdown(model)
            ckks = self._ckks.pop(model, None)
        if ckks is not None:
            ckks.shutdown()

    def close(self) -> None:
        import ray

        with self._cond:
            for m in list(self._executors):
                self._shutdown(m)
            for ex in self._ckks.values():
                if ex is not None:
                    ex.shutdown()
            self._ckks.clear()
        if self._owns_ray:  # an embedded Ray's processes must not outlive the service
            ray.shutdown()


def make_engine(kind: str, ray_address: str | None = None, workers: int | None = None,
                key_cache_bytes: int = 2 << 30) -> Engine:
    """`local`: in this process. `ray`: the Ray cluster at `ray_address` (or RAY_ADDRESS), else
    an embedded single-machine Ray."""
    if kind == "local":
        return LocalEngine(key_cache_bytes=key_cache_bytes)
    if kind == "ray":
        return RayEngine(ray_address or os.environ.get("RAY_ADDRESS") or None, workers, key_cache_bytes)
    raise GravelError(f"unknown executor {kind!r}: use 'local' or 'ray'")
