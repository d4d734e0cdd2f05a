"""Scatter each stage's shards to Ray actors, gather, go on; retry shards of lost workers.

One actor per worker slot (one CPU each, one OpenMP thread each, so W workers use W cores).
Evaluation keys go into Ray's object store once per session and are deserialized once per
worker. Shard outputs stay in the object store and flow from worker to worker; the driver only
moves references and small trace records. Each request picks the least-busy live workers, so
concurrent requests fill the gaps that one request's stage barriers leave.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gravel.cluster.trace import InferenceTrace, ShardRecord
from gravel.errors import ClusterError, InferenceCancelled, KeyMismatchError
from gravel.protocol import Kind, frame, load_manifest, unframe
from gravel.protocol.manifest import CLIENT_FILES, INPUT, MANIFEST, SERVER_FILES, stage_arguments
from gravel.server.runner import parse_blob

__all__ = ["ClusterError", "RayExecutor"]

MAX_ATTEMPTS = 3
STOP_POLL_S = 0.25  # how often a waiting stage asks should_stop
CPU_WAIT_S = 5.0  # actors killed a moment ago release their CPUs asynchronously


def _check_address(address: str) -> None:
    """Fail in seconds, not minutes, on an address where no Ray head listens."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc})") from exc


class RayExecutor:
    """Runs one artifact's inferences on a Ray cluster.

    `address=None` (and no RAY_ADDRESS) starts an embedded single-machine Ray; otherwise it
    joins the cluster at `address`. `workers=None` takes one worker per CPU the cluster has.
    """

    def __init__(
        self,
        artifact: str | Path,
        workers: int | None = None,
        address: str | None = None,
        threads_per_worker: int = 1,
        start_timeout_s: float = 60.0,
        shard_timeout_s: float = 300.0,
    ) -> None:
        import ray

        self.manifest = load_manifest(artifact, role="server")
        self.digest = self.manifest.digest
        self.shard_timeout_s = shard_timeout_s
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            _check_address(address)
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except ConnectionError as exc:
                raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}") from exc
        cpus = int(ray.cluster_resources().get("CPU", 0))
        workers = workers or cpus
        if workers < 1:
            raise ClusterError("the cluster has no CPUs")
        free = self._free_cpus(workers, wait_s=CPU_WAIT_S if workers <= cpus else 0.0)
        if free < workers:
            raise ClusterError(
                f"the cluster has {free} free CPUs of {cpus}; {workers} workers need {workers}. "
                "Stop other jobs, add nodes, or ask for fewer workers."
            )
        files = SERVER_FILES + CLIENT_FILES + (MANIFEST,)
        self._bundle = ray.put({name: self.manifest.path(name).read_bytes() for name in files})
        self._actor_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(
            _worker_class()
        ).options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads_per_worker)}})
        self._lock = threading.Lock()
        self._workers: dict[int, Any] = {}
        self._busy: dict[int, int] = {}
        self._next_index = 0
        self._sessions: dict[str, Any] = {}
        for _ in range(workers):
            self._spawn()
        self.worker_info = self._wait_ready(list(self._workers), start_timeout_s)

    # -- workers ---------------------------------------------------------------------------
    @staticmethod
    def _free_cpus(wanted: int, wait_s: float) -> int:
        """Free CPUs, waiting briefly for ones that killed actors are still handing back."""
        import ray

        deadline = time.time() + wait_s
        while True:
            free = int(ray.available_resources().get("CPU", 0))
            if free >= wanted or time.time() >= deadline:
                return free
            time.sleep(0.2)

    def _spawn(self) -> int:
        index = self._next_index
        self._next_index += 1
        self._workers[index] = self._actor_cls.remote(self._bundle, index)
        self._busy[index] = 0
        return index

    def _wait_ready(self, indices: list[int], timeout: float) -> list[dict[str, Any]]:
        import ray

        refs = [self._workers[i].ping.remote() for i in indices]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            raise ClusterError(f"{len(pending)} of {len(refs)} workers did not start within {timeout:.0f} s")
        try:
            return ray.get(ready)
        except Exception as exc:  # noqa: BLE001 - an actor that failed in __init__
            raise ClusterError(f"a worker failed to load the artifact: {exc}") from exc

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per live worker: index, node, pid, evaluation-key loads and shards run."""
        import ray

        return ray.get([w.ping.remote() for w in self._workers.values()])

    @property
    def workers(self) -> int:
        return len(self._workers)

    def _pick(self, exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        with self._lock:
            live = [i for i in self._workers if i not in exclude] or list(self._workers)
            if not live:
                raise ClusterError("no live workers left")
            index = min(live, key=lambda i: self._busy[i])
            self._busy[index] += 1
            return index

    def _release(self, index: int) -> None:
        with self._lock:
            if index in self._busy:
                self._busy[index] -= 1

    def _replace(self, index: int) -> None:
        """Drop a dead worker and start another in its place (best effort)."""
        with self._lock:
            if index not in self._workers:
                return
            del self._workers[index]
            del self._busy[index]
            self._spawn()

    def kill_worker(self, index: int | None = None) -> int:
        """Kill one worker process (for fault tests); returns its index."""
        import ray

        index = index if index is not None else next(iter(self._workers))
        ray.kill(self._workers[index], no_restart=True)
        return index

    # -- sessions --------------------------------------------------------------------------
    def open_session(self, evaluation_keys: bytes) -> str:
        """Check a client's evaluation keys and put them in the object store once."""
        import ray

        payload = unframe(evaluation_keys, Kind.EVALUATION_KEYS, self.digest, "evaluation keys")
        session = hashlib.sha256(payload).hexdigest()[:32]
        if session not in self._sessions:
            parse_blob(evaluation_keys, Kind.EVALUATION_KEYS, self.digest)
            self._sessions[session] = ray.put(payload)
        return session

    def close_session(self, session: str) -> None:
        self._sessions.pop(session, None)

    # -- inference -------------------------------------------------------------------------
    def infer(
        self, session: str, ciphertext: bytes, progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[bytes, InferenceTrace]:
        """One encrypted inference; returns the framed output ciphertext and its trace.

        `progress(stages_done, stages)` is called as each stage's shards are all back.
        `should_stop()` is asked before each stage and while a stage's shards run; when it
        answers True the stage's pending shards are cancelled and InferenceCancelled raised."""
        import ray

        if session not in self._sessions:
            raise KeyMismatchError(f"unknown session {session!r}; open it with the client's evaluation keys")
        payload, _ = parse_blob(ciphertext, Kind.INPUT_CIPHERTEXT, self.digest)
        keys_box = [self._sessions[session]]
        trace = InferenceTrace(started=time.time())
        outputs: dict[str, list] = {INPUT: [ray.put(payload)]}
        stop = should_stop or (lambda: False)
        for stage_index, row in enumerate(self.manifest.plan):
            if stop():
                raise InferenceCancelled(f"inference cancelled before {row['name']}")
            parts = stage_arguments(row, outputs)
            outputs[row["name"]] = self._run_stage(session, keys_box, stage_index, row, parts, trace, stop)
            if progress is not None:
                progress(stage_index + 1, len(self.manifest.plan))
        out = ray.get(outputs[self.manifest.plan[-1]["name"]][0])
        trace.finished = time.time()
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, out), trace

    def _submit(self, session, keys_box, stage_index, shard, parts, exclude=frozenset()):
        worker = self._pick(exclude)
        actor = self._workers[worker]
        data, meta = actor.run_shard.options(num_returns=2).remote(
            session, keys_box, stage_index, shard, time.time(), *parts
        )
        return worker, data, meta

    def _run_stage(self, session, keys_box, stage_index, row, parts, trace, stop=lambda: False) -> list:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

        pending: dict[Any, tuple[int, int, Any, int]] = {}  # meta ref -> (shard, worker, data ref, attempt)
        for shard in range(row["shards"]):
            worker, data, meta = self._submit(session, keys_box, stage_index, shard, parts)
            pending[meta] = (shard, worker, data, 1)
        outputs: dict[int, Any] = {}
        deadline = time.time() + self.shard_timeout_s
        while pending:
            wait_s = max(0.0, min(STOP_POLL_S, deadline - time.time()))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not ready and stop():
                for _, worker, data, _ in pending.values():
                    try:  # queued shards are dropped; a running one finishes on its own
                        ray.cancel(data, force=False)
                    except Exception:  # noqa: BLE001 - best effort: it may have just finished
                        pass
                    self._release(worker)
                raise InferenceCancelled(f"inference cancelled during {row['name']}")
            if not ready and time.time() < deadline:
                continue
            if not ready:
                raise ClusterError(
                    f"{row['name']}: {len(pending)} shards did not finish within {self.shard_timeout_s:.0f} s"
                )
            meta_ref = ready[0]
            shard, worker, data, attempt = pending.pop(meta_ref)
            self._release(worker)
            try:
                meta = ray.get(meta_ref)
            except (RayActorError, WorkerCrashedError, GetTimeoutError) as exc:
                self._replace(worker)
                if attempt >= MAX_ATTEMPTS:
                    raise ClusterError(
                        f"{row['name']} shard {shard} failed {attempt} times; last error: {exc}"
                    ) from exc
                trace.retries += 1
                new_worker, new_data, new_meta = self._submit(
                    session, keys_box, stage_index, shard, parts, exclude={worker}
                )
                pending[new_meta] = (shard, new_worker, new_data, attempt + 1)
                continue
            except Exception as exc:  # noqa: BLE001 - an error raised inside the shard itself
                raise ClusterError(f"{row['name']} shard {shard} failed: {exc}") from exc
            outputs[shard] = data
            trace.shards.append(ShardRecord(stage=row["name"], shard=shard, attempt=attempt, **meta))
        return [outputs[s] for s in range(row["shards"])]

    def shutdown(self) -> None:
        import ray

        for actor in self._workers.values():
            ray.kill(actor, no_restart=True)
        self._workers.clear()


def _worker_class():
    from gravel.cluster.worker import ShardWorker

    return ShardWorker
