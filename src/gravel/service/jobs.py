"""The queue between HTTP requests and the engine.

A request becomes a `Job`: one or more input ciphertexts for one session. `slots` threads take
jobs in arrival order and run their items on the engine. Jobs submitted through the job API are
persisted (input blob + row) before they are acknowledged, and re-queued when the service
starts again; a synchronous `/infer` request is not persisted: if the server dies under it, the
client sees the connection drop and sends it again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gravel.errors import GravelError
from gravel.protocol import pack_batch
from gravel.service.engine import Engine
from gravel.service.store import Store

__all__ = ["Job", "JobRunner"]

log = logging.getLogger("gravel.service")


@dataclass
class Job:
    id: str
    session: str
    model: str
    artifact: Path
    keys_sha: str
    items: list[bytes]
    persisted: bool
    batch: bool = False
    status: str = "queued"
    done: int = 0
    stage: float = 0.0  # progress inside the current item, 0..1
    result: bytes | None = None
    error: str | None = None
    compute_s: float = 0.0
    notify: Callable[[], None] | None = None  # called from the worker thread when finished

    @property
    def progress(self) -> float:
        return min(1.0, (self.done + self.stage) / max(1, len(self.items)))


class JobRunner:
    def __init__(self, store: Store, engine: Engine, on_finish: Callable[[Job], None] | None = None) -> None:
        self.store = store
        self.engine = engine
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}  # queued or running, for live progress
        self._lock = threading.Lock()
        self._on_finish = on_finish
        self.running = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"gravel-job-{i}", daemon=True) for i in range(engine.slots)
        ]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        """Jobs waiting or running (the queue-depth metric)."""
        with self._lock:
            return len(self._jobs)

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def live(self, jid: str) -> Job | None:
        with self._lock:
            return self._jobs.get(jid)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.id not in self._jobs:  # cancelled while queued
                    continue
                self.running += 1
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running -= 1
                    self._jobs.pop(job.id, None)
                if job.notify is not None:
                    job.notify()
                if self._on_finish is not None:
                    self._on_finish(job)

    def cancel(self, jid: str) -> None:
        with self._lock:
            self._jobs.pop(jid, None)

    def _run(self, job: Job) -> None:
        job.status = "running"
        if job.persisted:
            self.store.set_job_status(job.id, "running")
        outputs = []
        keys = lambda: self.store.read_blob(job.keys_sha)  # noqa: E731 - read only if not cached

        def progress(stages_done: int, stages: int) -> None:
            job.stage = stages_done / stages

        try:
            for item in job.items:
                t0 = time.perf_counter()
                outputs.append(self.engine.infer(job.model, job.artifact, job.session, keys, item, progress))
                job.compute_s += time.perf_counter() - t0
                job.done += 1
                job.stage = 0.0
                if job.persisted and len(job.items) > 1:
                    self.store.set_job_status(job.id, "running", job.done)
            job.result = pack_batch(outputs) if job.batch else outputs[0]
            job.status = "done"
        except GravelError as exc:
            job.error, job.status = str(exc), "failed"
        except Exception as exc:  # noqa: BLE001 - a backend failure must fail the job, not the thread
            log.exception("job %s failed", job.id)
            job.error, job.status = f"inference failed inside the backend: {exc}", "failed"
        if job.persisted:
            try:
                self.store.finish_job(job.id, job.result, job.error)
            except Exception:  # noqa: BLE001 - e.g. the session was deleted meanwhile
                log.exception("could not store the result of job %s", job.id)
