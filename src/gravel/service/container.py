"""The service container: the one object the routes share (settings, store, engine, job
runner, metrics), built at start-up and reached through `service_of(request)`; no module-level
state, so several services can run in one process (the tests do)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from gravel.service.api_errors import ApiError
from gravel.service.config import ServiceConfig
from gravel.service.engine import Engine
from gravel.service.jobs import Job, JobRunner
from gravel.service.metrics import Metrics
from gravel.service.store import Store

__all__ = ["Service", "service_of"]


@dataclass
class Service:
    config: ServiceConfig
    store: Store
    engine: Engine
    runner: JobRunner
    metrics: Metrics
    admin_hash: str
    started: float
    # Key uploads being received and checked; a non-blocking acquire turns the next one away.
    key_loads: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.key_loads = threading.BoundedSemaphore(max(1, self.config.max_key_loads))

    def model_row(self, name: str) -> dict[str, Any]:
        model = self.store.get_model(name)
        if model is None:
            raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists the deployed ones")
        return model

    def make_job(self, session: dict[str, Any], model: dict[str, Any], items: Sequence[bytes], persisted: bool,
                 batch: bool, jid: str | None = None) -> Job:
        """A job for the runner; `jid` is given when a stored job is re-queued after a restart."""
        return Job(
            id=jid or "j_" + secrets.token_hex(16),
            session=session["id"],
            model=model["name"],
            artifact=self.store.model_view(model),
            keys_sha=session["keys_sha"],
            items=items,
            persisted=persisted,
            batch=batch,
        )

    def finish(self, job: Job) -> None:
        self.metrics.jobs.labels(job.status).inc()

    def item_done(self, seconds: float) -> None:
        self.metrics.inference.observe(seconds)


def service_of(request: Request) -> Service:
    return request.app.state.service
