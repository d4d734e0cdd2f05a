"""The HTTP service: `create_app(config)` builds the FastAPI app that `gravel serve` runs
(through gravel.service.connections, which adds the connection limits).

Start-up opens the store (SQLite + blobs), starts the engine (in-process or Ray), re-queues
the jobs the last process acknowledged but did not finish, and starts the sweeper that expires
idle sessions and old results. Every error leaves as JSON `{"detail": "..."}` with the status
of whose fault it is (gravel.service.api_errors).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

import gravel
from gravel.protocol import is_batch
from gravel.service import routes_models, routes_sessions
from gravel.service.api_errors import install_error_handlers
from gravel.service.auth import hash_token, new_token
from gravel.service.config import ServiceConfig
from gravel.service.container import Service, service_of
from gravel.service.engine import make_engine
from gravel.service.jobs import JobRunner, StoredItems
from gravel.service.metrics import Metrics
from gravel.service.store import Store

__all__ = ["create_app"]

log = logging.getLogger("gravel.service")


class Health(BaseModel):
    status: str
    version: str


class Ready(BaseModel):
    ready: bool
    engine: str
    models: int
    sessions: int
    queue_depth: int
    uptime_s: float


def admin_hash(config: ServiceConfig) -> str:
    """The admin token's hash; without one configured, a random token is written (0600) to
    DATA_DIR/admin.token so that only whoever can read the data directory manages models."""
    if config.admin_token:
        return hash_token(config.admin_token)
    path = Path(config.data_dir) / "admin.token"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_token() + "\n")
    log.warning("no admin token given: using the one in %s", path)
    return hash_token(path.read_text().strip())


def _recover(svc: Service) -> int:
    """Re-queue the jobs acknowledged before the last stop and not finished (beyond the
    session quota if need be: they were accepted once)."""
    jobs = svc.store.unfinished_jobs()
    for row in jobs:
        with open(svc.store.blob_path(row["input_sha"]), "rb") as f:
            batch = is_batch(f.read(4))
        items = StoredItems(svc.store, row["input_sha"], row["items"], batch)
        session, model = svc.store.get_session(row["session"]), svc.store.get_model(row["model"])
        job = svc.make_job(session, model, items, persisted=True, batch=batch, jid=row["id"])
        svc.runner.submit(job, quota=False)
    return len(jobs)


async def _sweep(svc: Service) -> None:
    while True:
        await asyncio.sleep(svc.config.sweep_interval_s)
        try:
            c = svc.config
            gone = await run_in_threadpool(svc.store.expire, c.session_ttl_s, c.result_ttl_s, c.fetched_grace_s,
                                           svc.runner.busy_sessions())
            for sid in gone:
                svc.runner.cancel_session(sid)
                svc.engine.drop_session(sid)
            svc.metrics.sessions.set(svc.store.count_sessions())
        except Exception:  # noqa: BLE001 - the sweeper must outlive one bad pass
            log.exception("sweep failed")


def create_app(config: ServiceConfig | None = None) -> FastAPI:
    config = config or ServiceConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        store = Store(config.data_dir)
        engine = make_engine(config.executor, config.ray_address, config.workers, config.key_cache_bytes)
        metrics = Metrics()
        runner = JobRunner(store, engine, session_items=config.max_session_items)
        svc = Service(config, store, engine, runner, metrics, admin_hash(config), time.time())
        runner.on_finish, runner.on_item = svc.finish, svc.item_done
        app.state.service = svc
        recovered = _recover(svc)
        metrics.sessions.set(store.count_sessions())
        log.info("gravel service on %s: engine %s, %d models, %d jobs re-queued",
                 config.data_dir, engine.description, len(store.list_models()), recovered)
        sweeper = asyncio.create_task(_sweep(svc))
        yield
        sweeper.cancel()
        runner.close()
        engine.close()
        store.close()

    app = FastAPI(
        title="Gravel",
        version=gravel.__version__,
        description="Private inference on encrypted data: the server computes on TFHE or CKKS ciphertexts "
        "and never sees a secret key. Model management needs the admin token; a session's "
        "token reaches that session's keys, jobs and results only (Authorization: Bearer TOKEN). "
        "Client faults are answered 4xx with a message naming the problem; the server's own "
        "faults 5xx, with an error id that its log explains.",
        lifespan=lifespan,
    )
    app.include_router(routes_models.router)
    app.include_router(routes_models.admin_router)
    app.include_router(routes_sessions.keys_router)
    app.include_router(routes_sessions.session_router)
    app.include_router(routes_sessions.jobs_router)
    _ops_routes(app)
    install_error_handlers(app)
    app.add_middleware(ObserveRequests)
    return app


def _ops_routes(app: FastAPI) -> None:
    @app.get("/v1/health", response_model=Health, tags=["operations"], summary="Liveness")
    def health() -> Health:
        return Health(status="ok", version=gravel.__version__)

    @app.get("/v1/ready", response_model=Ready, tags=["operations"], summary="Readiness: store and engine up",
             responses={503: {"model": Ready}})
    def ready(request: Request):
        svc = service_of(request)
        ok = svc.store.integrity() == "ok"
        body = Ready(ready=ok, engine=svc.engine.description, models=len(svc.store.list_models()),
                     sessions=svc.store.count_sessions(), queue_depth=svc.runner.depth,
                     uptime_s=round(time.time() - svc.started, 3))
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        svc = service_of(request)
        svc.metrics.queue_depth.set(svc.runner.depth)
        svc.metrics.key_cache_bytes.set(svc.engine.key_cache.bytes)
        svc.metrics.key_cache_sessions.set(len(svc.engine.key_cache))
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")


class ObserveRequests:
    """Request metrics, as plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a
    client's disconnection from the routes, and /infer must see it to cancel its work."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        answer = {"status": 500, "bytes": 0}

        async def observed_send(message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"content-length":
                        answer["bytes"] = int(value)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            svc = getattr(scope["app"].state, "service", None)
            if svc is not None:
                label = getattr(scope.get("route"), "path", "unmatched")
                declared = dict(scope["headers"]).get(b"content-length", b"0")
                m = svc.metrics
                m.requests.labels(scope["method"], label, str(answer["status"])).inc()
                m.latency.labels(label).observe(time.perf_counter() - t0)
                m.bytes_in.labels(label).inc(int(declared) if declared.isdigit() else 0)
                m.bytes_out.labels(label).inc(answer["bytes"])
