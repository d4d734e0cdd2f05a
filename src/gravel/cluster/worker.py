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
    """Loads the server program once; deserializes a session's evaluation keys once.

    `bundle` holds the artifact's server-side files as bytes (shipped through Ray's object
    store, so a worker on another machine needs no shared file system); they are written to a
    private directory and verified against the manifest's hashes before loading.
    """

    def __init__(self, bundle: dict[str, bytes], index: int, cores: list[int] | None = None) -> None:
        import ray

        from gravel.cluster.bundle import unpack_bundle
        from gravel.server import ServerModel

        if cores:  # a "machine" of k pinned cores (benchmarks): every thread of this process
            _pin_process(cores)
        self.index = index
        self.cores = sorted(os.sched_getaffinity(0))
        self.node = ray.get_runtime_context().get_node_id()
        self.dir = unpack_bundle(bundle)
        self.model = ServerModel.load(self.dir)  # verifies the files against the manifest's hashes
        self.keys: OrderedDict[str, Any] = OrderedDict()
        self.key_loads = 0
        self.shards_run = 0

    def ping(self) -> dict[str, Any]:
        return {"worker": self.index, "node": self.node, "pid": os.getpid(), "cores": self.cores,
                "key_loads": self.key_loads, "shards_run": self.shards_run}

    def _session_keys(self, session: str, keys_box: list) -> Any:
        if session in self.keys:
            self.keys.move_to_end(session)
            return self.keys[session]
        import ray
        from concrete import fhe

        keys = fhe.EvaluationKeys.deserialize(ray.get(keys_box[0]))
        self.key_loads += 1
        self.keys[session] = keys
        while len(self.keys) > MAX_SESSIONS:
            self.keys.popitem(last=False)
        return keys

    def run_shard(
        self, session: str, keys_box: list, stage: int, shard: int, submitted: float, *parts: bytes
    ) -> tuple[bytes, dict[str, Any]]:
        """Evaluate one shard (stage -1: the whole inference, fused); `keys_box` wraps the keys' ObjectRef so Ray does not fetch it
        unless this worker has not seen the session yet."""
        from concrete import fhe

        started = time.time()
        keys = self._session_keys(session, keys_box)
        values = [fhe.Value.deserialize(p) for p in parts]
        t0 = time.perf_counter()
        if stage < 0:  # the whole network in one backend call (the artifact's fused function)
            out = self.model.output_payload(self.model.run(keys, values[0])[0])
        else:
            out = self.model.run_shard(stage, shard, values, keys).serialize()
        compute = time.perf_counter() - t0
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
