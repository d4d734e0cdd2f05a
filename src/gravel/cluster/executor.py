"""Scatter each stage's shards to Ray actors, gather, go on; retry shards of lost workers.

How one inference runs depends on where: one worker (or an artifact whose stages are one shard
each) runs the whole network in one backend call, the artifact's fused function where it has
one, since every backend call pays a fixed cost (concrete converts all bootstrap keys to the
Fourier domain per call). More workers run each stage's shards side by side. Many inferences
at once (`infer_many`) run data-parallel, whole inferences on different workers, when there
are at least as many as workers: no shard outputs move and no stage waits for another worker.

One actor per worker slot (one CPU each, one OpenMP thread each, so W workers use W cores).
Evaluation keys go into Ray's object store once per session and are deserialized once per
worker. Shard outputs stay in the object store and flow from worker to worker; the driver only
moves references and small trace records. Each request picks the least-busy live workers, so
concurrent requests fill the gaps that one request's stage barriers leave.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gravel.cluster.connect import connect
from gravel.cluster.trace import InferenceTrace, ShardRecord
from gravel.errors import ClusterError, InferenceCancelled, KeyMismatchError
from gravel.protocol import Kind, frame, load_manifest, pack_parts, unframe
from gravel.protocol.manifest import CLIENT_FILES, INPUT, MANIFEST, SERVER_FILES, stage_arguments
from gravel.server.runner import parse_blob
from gravel.tuning import backend_env

__all__ = ["ClusterError", "RayExecutor", "FUSED_STAGE"]

MAX_ATTEMPTS = 3
STOP_POLL_S = 0.25  # how often a waiting stage asks should_stop
CPU_WAIT_S = 5.0  # actors killed a moment ago release their CPUs asynchronously
FUSED_STAGE = -1  # stage index of a whole inference in one call (see ShardWorker.run_shard)


class _ShardLost(Exception):
    """A shard of a dataflow inference failed; `workers` are those that may have died."""

    def __init__(self, workers: set[int]) -> None:
        super().__init__(f"a shard failed on one of workers {sorted(workers)}")
        self.workers = workers


class RayExecutor:
    """Runs one artifact's inferences on a Ray cluster.

    `address=None` (and no RAY_ADDRESS) starts an embedded single-machine Ray; otherwise it
    joins the cluster at `address`. `workers=None` takes one worker per shard of the artifact's
    widest stage (at most one per CPU): a plan of one shard per stage gets one worker. Each
    worker runs the backend on `threads_per_worker` cores; by default the cores of the
    cluster's smallest node shared among the workers a node holds. `pin_cores=True` pins worker i to its own
    `threads_per_worker` cores of its node (cores i*k .. i*k+k-1, modulo the node's cores):
    the benchmarks' model of "W machines of k cores" on one host.
    """

    def __init__(
        self,
        artifact: str | Path,
        workers: int | None = None,
        address: str | None = None,
        threads_per_worker: int | None = None,
        start_timeout_s: float = 60.0,
        shard_timeout_s: float = 300.0,
        pin_cores: bool = False,
    ) -> None:
        import ray

        self.manifest = load_manifest(artifact, role="server")
        self.digest = self.manifest.digest
        self.shard_timeout_s = shard_timeout_s
        cpus, node_cpus = connect(address)
        widest = max(row["shards"] for row in self.manifest.plan)
        workers = workers or max(1, min(widest, cpus))
        if threads_per_worker is None:
            per_node = -(-workers // len(node_cpus))  # workers a node holds when they spread evenly
            threads_per_worker = max(1, min(node_cpus) // per_node)
        if threads_per_worker < 1 or workers < 1:
            raise ClusterError(f"workers ({workers}) and threads_per_worker ({threads_per_worker}) must be at least 1")
        if threads_per_worker > max(node_cpus):
            raise ClusterError(f"a worker of {threads_per_worker} threads needs a node with {threads_per_worker} "
                               f"CPUs; the largest node has {max(node_cpus)}")
        need = workers * threads_per_worker
        free = self._free_cpus(need, wait_s=CPU_WAIT_S if need <= cpus else 0.0)
        if free < need:
            raise ClusterError(
                f"the cluster has {free} free CPUs of {cpus}; {workers} workers of {threads_per_worker} "
                f"threads need {need}. Stop other jobs, add nodes, or ask for fewer workers."
            )
        self.threads_per_worker = threads_per_worker
        self._pin = pin_cores
        self.fused = bool(self.manifest.data.get("fused"))
        files = SERVER_FILES + CLIENT_FILES + (MANIFEST,)
        self._bundle = ray.put({name: self.manifest.path(name).read_bytes() for name in files})
        self._actor_cls = ray.remote(num_cpus=threads_per_worker, max_restarts=0, max_task_retries=0)(
            _worker_class()
        ).options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads_per_worker), **backend_env()}})
        self._lock = threading.Lock()
        self._workers: dict[int, Any] = {}
        self._busy: dict[int, int] = {}
        self._next_index = 0
        self._inflight = 0  # inferences running now (choose_mode)
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
        cores = None
        if self._pin:
            k, n = self.threads_per_worker, os.cpu_count() or 1
            cores = sorted({(index * k + j) % n for j in range(k)})
        self._workers[index] = self._actor_cls.remote(self._bundle, index, cores)
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
    @property
    def mode(self) -> str:
        """How one inference runs here: "whole" (one backend call on one worker: one worker,
        or an artifact with no stage of several shards) or "sharded" (stage by stage)."""
        one_call = self.workers == 1 or all(row["shards"] == 1 for row in self.manifest.plan)
        return "whole" if one_call else "sharded"

    def choose_mode(self) -> str:
        """The mode for one more inference now: "whole" when the plan has nothing to spread or
        the other inferences in flight already give every worker one (data-parallel across
        requests empties the queue sooner than interleaving their shards), else "sharded"."""
        with self._lock:
            others = self._inflight
        busy = others > 0 and others >= self.workers - 1
        return "whole" if self.mode == "whole" or busy else "sharded"

    def infer(
        self, session: str, ciphertext: bytes, progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None, mode: str | None = None,
    ) -> tuple[bytes, InferenceTrace]:
        """One encrypted inference; returns the framed output ciphertext and its trace, whose
        `mode` says how it ran (`mode=None`: `choose_mode()`).

        `progress(stages_done, stages)` is called as each stage's shards are all back.
        `should_stop()` is asked before each stage and while a stage's shards run; when it
        answers True the stage's pending shards are cancelled and InferenceCancelled raised."""
        if session not in self._sessions:
            raise KeyMismatchError(f"unknown session {session!r}; open it with the client's evaluation keys")
        payload, _ = parse_blob(ciphertext, Kind.INPUT_CIPHERTEXT, self.digest)
        mode = mode or self.choose_mode()
        if mode not in ("whole", "sharded"):
            raise ValueError(f"mode {mode!r}: use 'whole' or 'sharded'")
        with self._lock:
            self._inflight += 1
        try:
            return self._infer(session, payload, mode, progress, should_stop or (lambda: False))
        finally:
            with self._lock:
                self._inflight -= 1

    def _infer(self, session: str, payload: bytes, mode: str, progress, stop) -> tuple[bytes, InferenceTrace]:
        import ray

        keys_box = [self._sessions[session]]
        trace = InferenceTrace(started=time.time(), mode=mode)
        if mode == "whole":
            if stop():
                raise InferenceCancelled("inference cancelled before it started")
            row = {"name": "whole", "shards": 1}
            out_ref = self._run_stage(session, keys_box, FUSED_STAGE, row, [ray.put(payload)], trace, stop)[0]
            if progress is not None:
                progress(1, 1)
            out = ray.get(out_ref)
            trace.finished = time.time()
            return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, out), trace
        payload_ref = ray.put(payload)
        try:
            out = self._infer_dataflow(session, keys_box, payload_ref, trace, progress, stop)
        except _ShardLost as lost:
            # a worker died: replace the dead, then run stage by stage, retrying shard by shard
            self._replace_dead(lost.workers)
            trace.retries += 1
            out = self._infer_by_stage(session, keys_box, payload_ref, trace, progress, stop)
        trace.finished = time.time()
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, out), trace

    def _infer_dataflow(self, session, keys_box, payload_ref, trace, progress, stop) -> bytes:
        """Every stage's shards submitted at once, each reading its inputs' object references:
        Ray starts a shard as soon as the shards it reads are done, with no round trip through
        this driver between stages. Raises _ShardLost when a shard fails (its dependants would
        only fail after it), after cancelling what is still queued."""
        import ray

        plan = self.manifest.plan
        outputs: dict[str, list] = {INPUT: [payload_ref]}
        pending: dict[Any, tuple[int, int, int, Any]] = {}  # meta ref -> (stage, shard, worker, data ref)
        for i, row in enumerate(plan):
            refs = []
            for shard in range(row["shards"]):
                worker, data, meta = self._submit(session, keys_box, i, shard, stage_arguments(row, outputs))
                pending[meta] = (i, shard, worker, data)
                refs.append(data)
            outputs[row["name"]] = refs
        left = [row["shards"] for row in plan]
        done = 0
        deadline = time.time() + self.shard_timeout_s * len(plan)

        def drop_pending() -> None:
            self._drop([(worker, data) for _, _, worker, data in pending.values()])

        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, min(STOP_POLL_S, deadline - time.time())))
            if not ready:
                if stop():
                    drop_pending()
                    raise InferenceCancelled(f"inference cancelled during {plan[done]['name']}")
                if time.time() < deadline:
                    continue
                stages = sorted({plan[i]["name"] for i, *_ in pending.values()})
                drop_pending()
                raise ClusterError(f"{', '.join(stages)}: {len(pending)} shards did not finish within "
                                   f"{self.shard_timeout_s * len(plan):.0f} s")
            i, shard, worker, _ = pending.pop(ready[0])
            self._release(worker)
            try:
                meta = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - a dead worker, or an error inside the shard
                workers = {worker} | {w for _, _, w, _ in pending.values()}
                drop_pending()
                raise _ShardLost(workers) from exc
            trace.shards.append(ShardRecord(stage=plan[i]["name"], shard=shard, attempt=1, **meta))
            left[i] -= 1
            while done < len(plan) and left[done] == 0:
                done += 1
                if progress is not None:
                    progress(done, len(plan))
        return pack_parts(ray.get(outputs[plan[-1]["name"]]))

    def _infer_by_stage(self, session, keys_box, payload_ref, trace, progress, stop) -> bytes:
        """Stage by stage with a gather between stages: slower than dataflow, but each failed
        shard is retried on another worker (up to MAX_ATTEMPTS) without redoing its stage."""
        import ray

        outputs: dict[str, list] = {INPUT: [payload_ref]}
        for stage_index, row in enumerate(self.manifest.plan):
            if stop():
                raise InferenceCancelled(f"inference cancelled before {row['name']}")
            parts = stage_arguments(row, outputs)
            outputs[row["name"]] = self._run_stage(session, keys_box, stage_index, row, parts, trace, stop)
            if progress is not None:
                progress(stage_index + 1, len(self.manifest.plan))
        return pack_parts(ray.get(outputs[self.manifest.plan[-1]["name"]]))

    def _drop(self, submitted: list[tuple[int, Any]]) -> None:
        """Cancel shards still queued ((worker, data ref) pairs) and free their workers; a shard
        already running finishes on its own."""
        import ray

        for worker, data in submitted:
            try:
                ray.cancel(data, force=False)
            except Exception:  # noqa: BLE001 - best effort: it may have just finished
                pass
            self._release(worker)

    def _replace_dead(self, indices: set[int]) -> None:
        """Replace those of `indices` whose actor no longer answers a ping."""
        import ray

        for index in indices:
            actor = self._workers.get(index)
            if actor is None:
                continue
            try:
                ray.get(actor.ping.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - dead, or too wedged to trust
                self._replace(index)

    def infer_many(
        self, session: str, ciphertexts: list[bytes], should_stop: Callable[[], bool] | None = None,
    ) -> tuple[list[bytes], InferenceTrace, str]:
        """Several inferences; returns their framed outputs, one trace and the mode chosen.

        "data-parallel" (whole inferences on different workers, each in one backend call) when
        there are at least as many as workers, or one inference is "whole" anyway: that empties
        the queue sooner, as no shard outputs travel and no worker waits at a stage barrier.
        Fewer inferences than workers run one after another, each sharded over all workers."""
        import ray

        if session not in self._sessions:
            raise KeyMismatchError(f"unknown session {session!r}; open it with the client's evaluation keys")
        if len(ciphertexts) < self.workers and self.mode == "sharded":
            outs, trace = [], InferenceTrace(started=time.time())
            for ct in ciphertexts:
                out, t = self.infer(session, ct, should_stop=should_stop, mode="sharded")
                outs.append(out)
                trace.shards.extend(t.shards)
                trace.retries += t.retries
            trace.finished = time.time()
            return outs, trace, "sharded"
        refs = [ray.put(parse_blob(ct, Kind.INPUT_CIPHERTEXT, self.digest)[0]) for ct in ciphertexts]
        trace = InferenceTrace(started=time.time(), mode="data-parallel")
        row = {"name": "whole", "shards": len(refs)}
        with self._lock:  # concurrent single requests see these in flight (choose_mode)
            self._inflight += len(refs)
        try:
            out_refs = self._run_stage(session, [self._sessions[session]], FUSED_STAGE, row, refs, trace,
                                       should_stop or (lambda: False), per_shard=True)
        finally:
            with self._lock:
                self._inflight -= len(refs)
        outs = [frame(Kind.OUTPUT_CIPHERTEXT, self.digest, out) for out in ray.get(out_refs)]
        trace.finished = time.time()
        return outs, trace, "data-parallel"

    def _submit(self, session, keys_box, stage_index, shard, parts, exclude=frozenset()):
        worker = self._pick(exclude)
        actor = self._workers[worker]
        data, meta = actor.run_shard.options(num_returns=2).remote(
            session, keys_box, stage_index, shard, time.time(), *parts
        )
        return worker, data, meta

    def _run_stage(self, session, keys_box, stage_index, row, parts, trace, stop=lambda: False,
                   per_shard: bool = False) -> list:
        """Run a stage's shards (`per_shard`: shard j reads only parts[j], for data-parallel
        whole inferences) and gather their output references, retrying lost workers' shards."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

        pending: dict[Any, tuple[int, int, Any, int]] = {}  # meta ref -> (shard, worker, data ref, attempt)
        def args(shard: int) -> list:
            return [parts[shard]] if per_shard else parts

        for shard in range(row["shards"]):
            worker, data, meta = self._submit(session, keys_box, stage_index, shard, args(shard))
            pending[meta] = (shard, worker, data, 1)
        outputs: dict[int, Any] = {}
        rounds = -(-row["shards"] // self.workers) if per_shard else 1  # queued whole inferences
        deadline = time.time() + self.shard_timeout_s * rounds
        while pending:
            wait_s = max(0.0, min(STOP_POLL_S, deadline - time.time()))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not ready and stop():
                self._drop([(worker, data) for _, worker, data, _ in pending.values()])
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
                    session, keys_box, stage_index, shard, args(shard), exclude={worker}
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
