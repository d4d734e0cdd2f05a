"""The service object the routes share, and helpers every route needs: authentication,
size-limited streaming of request bodies, and errors that become 4xx JSON answers."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from gravel.service.auth import bearer, token_matches
from gravel.service.config import ServiceConfig
from gravel.service.engine import Engine
from gravel.service.jobs import Job, JobRunner
from gravel.service.metrics import Metrics
from gravel.service.store import BlobWriter, Store, TooLarge

__all__ = ["ERRORS", "ApiError", "ErrorBody", "Service", "read_body", "service_of"]

log = logging.getLogger("gravel.service")


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed, truncated or mismatched body (the message names the problem)",
        401: "No bearer token",
        403: "Wrong token for this resource",
        404: "Unknown model, session or job",
        405: "Method not allowed",
        409: "Conflict: the resource is not in a state for this request",
        413: "Body over the server's size limit",
        415: "Wrong content type",
        422: "Invalid parameters, or the inference failed",
    }.items()
}


class ApiError(HTTPException):
    """A 4xx answer with a JSON message that names the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)


@dataclass
class Service:
    config: ServiceConfig
    store: Store
    engine: Engine
    runner: JobRunner
    metrics: Metrics
    admin_hash: str
    started: float

    # -- auth -------------------------------------------------------------------------------
    def require_admin(self, request: Request) -> None:
        token = bearer(request.headers.get("authorization"))
        if token is None:
            raise ApiError(401, "model management needs the admin token (Authorization: Bearer TOKEN)",
                           {"WWW-Authenticate": "Bearer"})
        if not token_matches(token, self.admin_hash):
            raise ApiError(403, "wrong admin token")

    def session_for(self, request: Request, sid: str) -> dict[str, Any]:
        """The session row, if the request carries its token; touches its idle clock."""
        token = bearer(request.headers.get("authorization"))
        if token is None:
            raise ApiError(401, "this call needs the session's token (Authorization: Bearer TOKEN)",
                           {"WWW-Authenticate": "Bearer"})
        session = self.store.get_session(sid)
        if session is None:
            raise ApiError(404, f"unknown session {sid!r} (expired or deleted?); open a new one")
        if not token_matches(token, session["token_hash"]):
            raise ApiError(403, "this token does not belong to that session")
        if time.time() - session["last_used"] > 60:
            self.store.touch_session(sid)
        return session

    def model_row(self, name: str) -> dict[str, Any]:
        model = self.store.get_model(name)
        if model is None:
            raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists the deployed ones")
        return model

    def make_job(self, session: dict[str, Any], model: dict[str, Any], items: list[bytes], persisted: bool,
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
        if job.done:
            self.metrics.inference.observe(job.compute_s / job.done)


def service_of(request: Request) -> Service:
    return request.app.state.service


def check_type(request: Request, *allowed: str) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in allowed:
        raise ApiError(415, f"content type {ctype or 'none'!r}: this endpoint takes {' or '.join(allowed)}")


async def read_body(request: Request, store: Store, limit: int, what: str) -> BlobWriter:
    """Stream the body into a temporary blob file, refusing it once it passes `limit` bytes.
    The caller adopts the file into the store or discards it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"{what}: {declared} bytes is over this server's limit of {limit}")
    writer = await run_in_threadpool(store.writer, limit)
    try:
        async for chunk in request.stream():
            writer.write(chunk)
        if writer.size == 0:
            raise ApiError(400, f"{what}: empty body")
        await run_in_threadpool(writer.finish)
    except TooLarge:
        writer.discard()
        raise ApiError(413, f"{what}: over this server's limit of {limit} bytes") from None
    except BaseException:
        writer.discard()
        raise
    return writer
