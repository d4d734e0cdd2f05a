"""The error catalogue: every status the API answers, and whose fault each one is.

A client's fault (malformed body, wrong token, unknown id, over a limit) is a 4xx whose message
names the problem and what to do. The server's own fault is a 5xx: 507 when its disk is full,
503 when it is busy or its cluster is unreachable (with Retry-After), otherwise 500 with an
error id; the id and the traceback go to the server's log, and the answer carries no path, no
backend type and no exception text, since those describe the server, not the request.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gravel.errors import (
    ArtifactError,
    DataError,
    GravelError,
    InputError,
    KeyMismatchError,
    ModelError,
    StorageFullError,
)

__all__ = [
    "ERRORS",
    "ApiError",
    "ErrorBody",
    "client_status",
    "install_error_handlers",
    "new_error_id",
    "scrub",
]

log = logging.getLogger("gravel.service")

# Errors that describe what a client (or the admin deploying) sent: answered 4xx as they are.
CLIENT_FAULTS: tuple[type[GravelError], ...] = (KeyMismatchError, InputError, ArtifactError, ModelError, DataError)


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
        408: "The body paused longer than the server's body timeout",
        409: "Conflict: the resource is not in a state for this request",
        413: "Body over the server's size limit, or larger than this model's keys or inputs can be",
        415: "Wrong content type",
        422: "Invalid parameters, or the inference failed because of its input",
        429: "This session's queue is full (Retry-After)",
        500: "The server's own fault; the message gives an error id that its log explains",
        503: "The server is busy (too many key uploads at once) or its cluster is unreachable (Retry-After)",
        507: "The server's disk is full: nothing new can be stored, what is stored is intact",
    }.items()
}


class ApiError(HTTPException):
    """An answer with a JSON message that names the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)


def new_error_id() -> str:
    return "e_" + secrets.token_hex(6)


def client_status(exc: BaseException) -> int | None:
    """The 4xx status of an error that is the client's fault, None for the server's own."""
    return 400 if isinstance(exc, CLIENT_FAULTS) else None


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\"():,]+/)+[^\s/'\"():,]*")


def scrub(text: str, names: dict[str, str] | None = None) -> str:
    """A message without the server's file system in it: known directories become their role
    (e.g. the unpacked upload becomes "artifact"), any other absolute path becomes "<path>"."""
    for path, label in sorted((names or {}).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path.rstrip("/") + "/", label + "/").replace(path.rstrip("/"), label)
    return _ABS_PATH.sub("<path>", text)


def _answer(request: Request, detail: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer. To a request with a body, it also closes the connection: the rest of a
    refused upload is then not received (and discarded) after the answer."""
    headers = dict(headers or {})
    if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
        headers["Connection"] = "close"
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def server_fault(exc: BaseException, request: Request) -> JSONResponse:
    """The answer to a fault of the server's: its class decides the status; details go to the
    log under an id that the answer quotes."""
    from gravel.cluster.executor import ClusterError

    eid = new_error_id()
    if isinstance(exc, StorageFullError):
        log.error("error %s on %s %s: %s", eid, request.method, request.url.path, exc)
        return _answer(request, f"{exc} (error id {eid})", 507)
    log.error("error %s on %s %s", eid, request.method, request.url.path, exc_info=exc)
    if isinstance(exc, ClusterError):
        return _answer(request, f"the server's cluster cannot run this now; try again later (error id {eid})",
                       503, {"Retry-After": "10"})
    return _answer(request, f"internal error on the server, not caused by this request (error id {eid}; "
                            "the server's log has the details)", 500)


def install_error_handlers(app: FastAPI) -> None:
    """Every answer leaves as JSON {"detail": "..."}, with the status its fault calls for."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists only the first matching route's methods
            headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
        return _answer(request, exc.detail, exc.status_code, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(GravelError)
    async def gravel_error(request: Request, exc: GravelError):
        status = client_status(exc)
        if status is None:
            return server_fault(exc, request)
        return _answer(request, scrub(str(exc)), status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return server_fault(exc, request)


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return methods
