"""CKKS inference on Ray: a batch's groups spread over workers (data-parallel).

A CKKS batch is packed in groups of `block` samples (see gravel.ckks.program); the groups are
independent, so the driver cuts the client's input blob into runs of whole groups at the byte
level (`CkksServer.split_batch`: no keys, no ciphertext parsed), each worker evaluates its run
with the session's public context (deserialized once per worker and kept), and the driver
joins the output blobs in order. A batch of one group runs on one worker; one image runs on one
worker, or (`split_single`) its first matrix is split among the workers by diagonal blocks
whose partial products the driver adds before running the rest.

Each worker is one process with one CPU: SEAL through TenSEAL holds Python's GIL during every
operation, so processes, not threads, are how a batch uses several cores.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gravel.cluster.connect import connect
from gravel.errors import ClusterError, GravelError
from gravel.protocol import load_manifest

__all__ = ["CkksRayExecutor", "CkksWorker"]

_FILES = ("manifest.json", "client.ckks.json", "weights.npz")
MAX_CONTEXTS = 4  # public contexts a worker keeps (one per session in use)


class _ByKeys:
    """What `make` builds from a session's key bytes, kept for the MAX_CONTEXTS key sets used
    last (by their SHA-256): a public context is deserialized, or put in Ray's object store,
    once per session, not once per request."""

    def __init__(self, make: Callable[[bytes], Any]) -> None:
        self._make = make
        self._items: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, keys: bytes) -> Any:
        digest = hashlib.sha256(keys).digest()
        with self._lock:
            if digest in self._items:
                self._items.move_to_end(digest)
                return self._items[digest]
        value = self._make(keys)
        with self._lock:
            self._items[digest] = value
            while len(self._items) > MAX_CONTEXTS:
                self._items.popitem(last=False)
        return value


class CkksWorker:
    """The Ray actor body: one artifact's CkksServer and a few sessions' public contexts."""

    def __init__(self, bundle: dict[str, bytes]) -> None:
        from gravel.ckks.artifact import load_server
        from gravel.cluster.bundle import unpack_bundle

        self.dir = unpack_bundle(bundle)
        self.server = load_server(self.dir)  # verifies the files against the manifest's hashes
        # `run` checks the rotations of the input's mode
        self.contexts = _ByKeys(lambda keys: self.server.load_keys(keys, modes=()))

    def ready(self) -> bool:
        return True

    def load(self, keys: bytes) -> None:
        self.contexts.get(keys)

    def run(self, keys: bytes, data: bytes) -> bytes:
        return self.server.run(self.contexts.get(keys), data)

    def part(self, keys: bytes, data: bytes, part: int, parts: int) -> bytes:
        return self.server.single_part(self.contexts.get(keys), data, part, parts)


class CkksRayExecutor:
    """Runs one CKKS artifact's inferences on a Ray cluster.

    `address=None` (and no RAY_ADDRESS) starts an embedded single-machine Ray. `workers=None`:
    one worker per CPU of the cluster. `split_single`: one image's first (largest) matrix is
    split among the workers by giant steps of its diagonals, each returning its partial
    product, and the driver adds them and runs the rest of the network (it loads the session's
    public context too); otherwise one image runs whole on one worker.
    """

    def __init__(self, artifact: str | Path, workers: int | None = None, address: str | None = None,
                 start_timeout_s: float = 60.0, timeout_s: float = 600.0,
                 split_single: bool = False) -> None:
        import ray

        from gravel.ckks.artifact import load_server

        self.manifest = load_manifest(artifact, role="server", backends=("ckks",))
        if self.manifest.backend != "ckks":
            raise ClusterError(f"{self.manifest.root}: a {self.manifest.backend} artifact; "
                               "the CKKS executor runs CKKS ones (use RayExecutor)")
        self.server = load_server(self.manifest)  # the driver's copy: splits and joins batches
        self.timeout_s = timeout_s
        cpus, _ = connect(address)
        workers = workers or max(1, cpus)
        if workers < 1 or workers > max(cpus, 1):
            raise ClusterError(f"{workers} CKKS workers need {workers} CPUs; the cluster has {cpus}")
        bundle = ray.put({name: self.manifest.path(name).read_bytes() for name in _FILES})
        actor = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(CkksWorker)
        self._workers = [actor.remote(bundle) for _ in range(workers)]
        try:
            ray.get([w.ready.remote() for w in self._workers], timeout=start_timeout_s)
        except Exception as exc:  # Ray's start-up failures have many types
            self.shutdown()
            raise ClusterError(f"CKKS workers did not start within {start_timeout_s:.0f} s: {exc}") from exc
        self._keys = _ByKeys(lambda keys: ray.put(bytes(keys)))  # object-store references
        self._contexts = _ByKeys(lambda keys: self.server.load_keys(keys, modes=()))  # split_single
        self.split_single = split_single and workers > 1
        self._next = itertools.count()

    @property
    def workers(self) -> int:
        return len(self._workers)

    def warm(self, keys: bytes) -> None:
        """Every worker deserializes `keys` now (a session's first request otherwise pays it on
        whichever workers it reaches first)."""
        import ray

        ref = self._keys.get(keys)
        ray.get([w.load.remote(ref) for w in self._workers], timeout=self.timeout_s)
        if self.split_single:
            self._contexts.get(keys)

    def run(self, keys: bytes, data: bytes) -> bytes:
        """Input blob -> output blob, as `CkksServer.run` but a batch's groups over the workers."""
        import ray

        from gravel.ckks.server import input_header

        keys_ref = self._keys.get(keys)
        start = next(self._next)
        n = len(self._workers)
        single = self.split_single and input_header(data).get("mode") == "single"
        if single:
            refs = [self._workers[(start + i) % n].part.remote(keys_ref, data, i, n) for i in range(n)]
        else:
            parts = self.server.split_batch(data, n)
            refs = [self._workers[(start + i) % n].run.remote(keys_ref, part) for i, part in enumerate(parts)]
        try:
            replies = ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as exc:
            for ref in refs:
                ray.cancel(ref, force=False)
            if isinstance(exc.cause, GravelError):  # the client's fault, named by the server
                raise exc.cause from None
            raise ClusterError(f"a CKKS worker failed: {exc.cause!r}") from exc
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            raise ClusterError(f"CKKS inference did not complete on the workers: {exc}") from exc
        if single:
            return self.server.single_finish(self._contexts.get(keys), replies)
        return self.server.merge_outputs(replies)

    def shutdown(self) -> None:
        import ray

        for w in self._workers:
            ray.kill(w, no_restart=True)
        self._workers = []
