"""The queue between HTTP requests and the engine.

A request becomes a `Job`: one or more input ciphertexts for one session. `slots` threads run
the items of all jobs, taking them in turn from each session that has work (round robin, item
by item), so one session's 4,096-item batch delays another session's request by one item, not
by the whole batch. Each session may have at most `session_items` items queued (not yet
started; running ones are bounded by the slots); `submit` refuses more with QueueFull (the
API's 429).

Cancelling a job (DELETE, a closed session, a client that dropped its waiting request) skips
its items not yet started and stops the running ones at the engine's next check, between
stages or shards.

Jobs submitted through the job API are persisted (input blob + row) before they are
acknowledged, and re-queued when the service starts again; a synchronous `/infer` request is
not persisted: if the server dies under it, the client sees the connection drop and sends it
again. When a job's result cannot be stored (full disk) the job fails with that message, in
the store if the store can still take the status, else in memory, and its input stays stored,
so a restart with space runs it again.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gravel.errors import GravelError, InferenceCancelled, StorageFullError
from gravel.protocol import pack_batch, unpack_batch
from gravel.service.api_errors import client_status, new_error_id
from gravel.service.engine import Engine
from gravel.service.store import Store

__all__ = ["Job", "JobRunner", "QueueFull", "StoredItems"]

log = logging.getLogger("gravel.service")


class QueueFull(Exception):
    """A session asked for more queued items than its quota."""


class StoredItems(Sequence[bytes]):
    """A persisted job's inputs, read from its stored blob one at a time as they run, so that
    queued jobs hold no ciphertexts in memory (only /infer's waiting requests do)."""

    def __init__(self, store: Store, sha: str, count: int, batch: bool) -> None:
        self._path = store.blob_path(sha)
        self._count = count
        self._batch = batch

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        with open(self._path, "rb") as f:
            if not self._batch:
                return f.read()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                views = unpack_batch(memoryview(mapped), "stored job input")
                item = bytes(views[index])
                for v in views:
                    v.release()
                del views
                return item


@dataclass
class Job:
    id: str
    session: str
    model: str
    artifact: Path
    keys_sha: str
    items: Sequence[bytes]  # in memory for /infer; StoredItems for a persisted job
    persisted: bool
    batch: bool = False
    status: str = "queued"  # queued, running, done, failed, cancelled
    done: int = 0
    stage: float = 0.0  # progress inside the latest item, 0..1
    result: bytes | None = None
    error: str | None = None
    error_status: int | None = None  # 4xx: the input's fault; 5xx: the server's
    compute_s: float = 0.0
    notify: Callable[[], None] | None = None  # called from a worker thread when finished
    cancelled: bool = False
    # scheduling state, under the runner's lock
    next: int = 0  # the next item to start
    active: int = 0  # items running now
    finished: bool = False
    outputs: list[bytes | None] = field(default_factory=list)

    @property
    def progress(self) -> float:
        return min(1.0, (self.done + self.stage) / max(1, len(self.items)))

    def should_stop(self) -> bool:
        return self.cancelled or self.error is not None


class JobRunner:
    def __init__(self, store: Store, engine: Engine, on_finish: Callable[[Job], None] | None = None,
                 session_items: int = 4096) -> None:
        self.store = store
        self.engine = engine
        self.session_items = session_items
        self._cond = threading.Condition()
        self._ready: dict[str, deque[Job]] = {}  # session -> jobs with items to start
        self._jobs: dict[str, Job] = {}  # queued or running, for live progress
        self._queued: dict[str, int] = {}  # session -> items of its live jobs not started yet
        self._unrecorded: dict[str, Job] = {}  # finished, but the store could not take the status
        self.on_finish = on_finish  # called with each finished job (metrics)
        self.on_item: Callable[[float], None] | None = None  # called with each item's engine seconds
        self._tick = 0
        self._served: dict[str, int] = {}  # session -> when it last had an item started
        self._closed = False
        self.running = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"gravel-job-{i}", daemon=True) for i in range(engine.slots)
        ]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        """Jobs waiting or running (the queue-depth metric)."""
        with self._cond:
            return len(self._jobs)

    def busy_sessions(self) -> set[str]:
        """Sessions with a job queued or running (not idle, whatever their clock says)."""
        with self._cond:
            return {job.session for job in self._jobs.values()}

    def queued_items(self, session: str) -> int:
        """Items of this session waiting for a slot."""
        with self._cond:
            return self._queued.get(session, 0)

    def submit(self, job: Job, quota: bool = True) -> Job:
        """Queue a job; with `quota`, refuse it (QueueFull) if its session would go over its
        item quota (a job re-queued at start-up was accepted before and is not refused)."""
        with self._cond:
            have = self._queued.get(job.session, 0)
            if quota and have + len(job.items) > self.session_items:
                raise QueueFull(
                    f"this session has {have} items queued and may have {self.session_items}; "
                    f"{len(job.items)} more do not fit: wait for its jobs to progress, or send fewer items"
                )
            job.outputs = [None] * len(job.items)
            self._jobs[job.id] = job
            self._count(job.session, len(job.items))
            self._ready.setdefault(job.session, deque()).append(job)
            self._cond.notify_all()
        return job

    def live(self, jid: str) -> Job | None:
        with self._cond:
            return self._jobs.get(jid) or self._unrecorded.get(jid)

    def cancel(self, jid: str) -> bool:
        """Stop a job: its items not started are skipped, a running one stops at the engine's
        next check. Returns whether the job was live."""
        with self._cond:
            self._unrecorded.pop(jid, None)
            job = self._jobs.get(jid)
            if job is None:
                return False
            job.cancelled = True
            self._unready(job)
            over = self._over(job)
        if over:
            self._finish(job)
        return True

    def cancel_session(self, session: str) -> None:
        with self._cond:
            jids = [j.id for j in self._jobs.values() if j.session == session]
        for jid in jids:
            self.cancel(jid)

    def close(self) -> None:
        """Stop: running items stop at their next check; persisted jobs stay queued in the
        store (a cancelled job's outcome is not stored) and run at the next start."""
        with self._cond:
            self._closed = True
            for job in self._jobs.values():
                job.cancelled = True
            self._cond.notify_all()

    # -- scheduling -------------------------------------------------------------------------
    def _claim(self) -> tuple[Job, int] | None:
        """The next item to run: the first job of the session served longest ago (or never)."""
        with self._cond:
            while not self._closed and not self._ready:
                self._cond.wait()
            if self._closed:
                return None
            session = min(self._ready, key=lambda s: self._served.get(s, 0))
            self._tick += 1
            self._served[session] = self._tick
            jobs = self._ready[session]
            job = jobs[0]
            index = job.next
            job.next += 1
            job.active += 1
            self._count(session, -1)
            if job.next >= len(job.items):
                jobs.popleft()
            if not jobs:
                del self._ready[session]
                del self._served[session]
            self.running += 1
            return job, index

    def _count(self, session: str, change: int) -> None:
        left = self._queued.get(session, 0) + change
        if left:
            self._queued[session] = left
        else:
            self._queued.pop(session, None)

    def _unready(self, job: Job) -> None:
        """No more items of this job will start: out of the queue and of its session's count."""
        jobs = self._ready.get(job.session)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._ready[job.session]
                self._served.pop(job.session, None)
        self._count(job.session, job.next - len(job.items))
        job.next = len(job.items)

    def _over(self, job: Job) -> bool:
        """Whether no item of the job will run any more; true once (the caller finishes it)."""
        if job.finished or job.active:
            return False
        if job.next >= len(job.items) or job.should_stop():
            job.finished = True
            return True
        return False

    def _loop(self) -> None:
        while (claim := self._claim()) is not None:
            job, index = claim
            try:
                self._run_item(job, index)
            finally:
                with self._cond:
                    self.running -= 1
                    job.active -= 1
                    over = self._over(job)
                if over:
                    self._finish(job)

    def _run_item(self, job: Job, index: int) -> None:
        if job.should_stop():
            return
        if job.status == "queued":
            job.status = "running"
            if job.persisted:
                self._record(job, lambda: self.store.set_job_status(job.id, "running"))

        def progress(stages_done: int, stages: int) -> None:
            job.stage = stages_done / stages

        def keys() -> bytes:  # read only if the engine has not cached them
            return self.store.read_blob(job.keys_sha)

        t0 = time.perf_counter()
        try:
            out = self.engine.infer(job.model, job.artifact, job.session, keys, job.items[index], progress,
                                    should_stop=job.should_stop)
        except InferenceCancelled:
            return
        except Exception as exc:  # noqa: BLE001 - a failure must fail the job, not the thread
            if not job.should_stop():  # a job deleted under its item may have lost its input
                self._fail(job, index, exc)
            return
        seconds = time.perf_counter() - t0
        with self._cond:
            job.outputs[index] = out
            job.compute_s += seconds
            job.done += 1
            job.stage = 0.0
        if self.on_item is not None:
            self.on_item(seconds)
        if job.persisted and len(job.items) > 1:
            self._record(job, lambda: self.store.set_job_status(job.id, "running", job.done))

    def _fail(self, job: Job, index: int, exc: BaseException) -> None:
        status = client_status(exc)
        if status is not None:
            message = str(exc)
        else:
            eid = new_error_id()
            log.error("error %s in job %s", eid, job.id, exc_info=exc)
            status = 507 if isinstance(exc, StorageFullError) else 500
            message = (f"{exc} (error id {eid})" if status == 507 else
                       f"the server failed to run this inference, not because of its input (error id {eid})")
        with self._cond:
            if job.error is None:
                where = f"item {index}: " if len(job.items) > 1 else ""
                job.error, job.error_status = where + message, status
            self._unready(job)

    def _record(self, job: Job, write: Callable[[], None]) -> None:
        """A progress write; on a full disk progress waits, the job goes on."""
        try:
            write()
        except (StorageFullError, GravelError) as exc:
            log.warning("job %s: progress not recorded: %s", job.id, exc)

    def _finish(self, job: Job) -> None:
        # The status turns final only once stored: a client that reads "done" can fetch the result.
        if job.cancelled:
            final = "cancelled"
        elif job.error is not None:
            final = "failed"
        else:
            job.result = pack_batch(job.outputs) if job.batch else job.outputs[0]  # type: ignore[arg-type]
            final = "done"
        job.outputs = []
        recorded = True
        if job.persisted and not job.cancelled:
            final, recorded = self._store_outcome(job, final)
        job.status = final
        with self._cond:
            self._jobs.pop(job.id, None)
            if not recorded:
                self._unrecorded[job.id] = job
        if job.notify is not None:
            job.notify()
        if self.on_finish is not None:
            self.on_finish(job)

    def _store_outcome(self, job: Job, final: str) -> tuple[str, bool]:
        """Store the result (or the failure). Returns the final status, and False when even a
        failure could not be stored, so the job's outcome lives in memory until the next start
        (where the job, whose input is still stored, runs again)."""
        try:
            self.store.finish_job(job.id, job.result, job.error, job.error_status)
            return final, True
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk; the worker thread must go on
            eid = new_error_id()
            log.error("error %s: job %s: result not stored", eid, job.id, exc_info=exc)
            full = isinstance(exc, StorageFullError)
            job.result, job.error_status = None, 507 if full else 500
            job.error = (f"{exc} (error id {eid})" if full else
                         f"the server could not store this job's result (error id {eid})")
        try:
            self.store.finish_job(job.id, None, job.error, job.error_status)
            return "failed", True
        except Exception as exc:  # noqa: BLE001
            log.error("job %s: its failure could not be stored either: %s", job.id, exc)
            return "failed", False
