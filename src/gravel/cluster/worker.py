"""The Ray actor body: holds one artifact's server program and a few sessions' keys."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any

__all__ = ["ShardWorker"]

MAX_SESSIONS = 8


def _pin_process(cores: list[int]) -> None:
    """Pin every thread of this process (Ray's own threads included, which started before
    this actor's code ran) and the threads it starts later to `cores`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass


class ShardWorker:
    """Holds one artifact's server program and a few sessions' evaluation keys, in a compute
    child process (cluster/compute.py: the backend runs 5-15 % faster there than on the Ray
    worker's own main thread); this actor moves the bytes between Ray and the child.

    `bundle` holds the artifact's server-side files as bytes (shipped through Ray's object
    store, so a worker on another machine needs no shared file system); they are written to one
    directory per node and verified against the manifest's hashes before loading. A child that
    dies takes this worker with it, so the executor retries the shard elsewhere.
    """

    def __init__(self, bundle: dict[str, bytes], index: int, cores: list[int] | None = None) -> None:
        import ray

        from gravel.cluster.bundle import unpack_bundle
        from gravel.cluster.compute import ChildDied, ComputeChild, InProcess

        if cores:  # a "machine" of k pinned cores (benchmarks): every thread of this process
            _pin_process(cores)
        self.index = index
        self.cores = sorted(os.sched_getaffinity(0))
        self.node = ray.get_runtime_context().get_node_id()
        self.dir = unpack_bundle(bundle)
        if os.environ.get("GRAVEL_WORKER_CHILD", "1") == "0":  # the backend on this process's main thread
            self.child = InProcess(self.dir)
        else:
            try:  # the child inherits this process's cores and environment; it verifies the files
                self.child = ComputeChild(self.dir)
            except ChildDied as exc:
                raise RuntimeError(str(exc)) from None
        self.sessions: OrderedDict[str, None] = OrderedDict()
        self.key_loads = 0
        self.shards_run = 0

    def ping(self) -> dict[str, Any]:
        return {"worker": self.index, "node": self.node, "pid": os.getpid(), "cores": self.cores,
                "key_loads": self.key_loads, "shards_run": self.shards_run, "child_pid": self.child.pid}

    def _ensure_keys(self, session: str, keys_box: list) -> None:
        if session in self.sessions:
            self.sessions.move_to_end(session)
            return
        import ray

        self._call(self.child.load_keys, session, ray.get(keys_box[0]))
        self.key_loads += 1
        self.sessions[session] = None
        while len(self.sessions) > MAX_SESSIONS:
            self._call(self.child.drop, self.sessions.popitem(last=False)[0])

    def _call(self, fn, *args):
        from gravel.cluster.compute import ChildDied

        try:
            return fn(*args)
        except ChildDied:
            os._exit(1)  # this worker is no use without its child: let Ray report it dead

    def run_shard(
        self, session: str, keys_box: list, stage: int, shard: int, submitted: float, *parts: bytes
    ) -> tuple[bytes, dict[str, Any]]:
        """Evaluate one shard (stage -1: the whole inference, fused); `keys_box` wraps the keys' ObjectRef so Ray does not fetch it
        unless this worker has not seen the session yet."""
        started = time.time()
        self._ensure_keys(session, keys_box)
        out, compute = self._call(self.child.run, session, stage, shard, list(parts))
        self.shards_run += 1
        return out, {
            "worker": self.index,
            "node": self.node,
            "pid": os.getpid(),
            "submitted": submitted,
            "started": started,
            "finished": time.time(),
            "compute_s": compute,
            "bytes_in": sum(len(p) for p in parts),
            "bytes_out": len(out),
        }
