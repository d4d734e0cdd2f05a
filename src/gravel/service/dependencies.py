"""Authentication as FastAPI dependencies, declared once per router.

A router that needs a token lists one of these in `APIRouter(dependencies=[...])`, so no route
can forget it, and FastAPI writes the bearer scheme into the OpenAPI document. A route that
needs the row the check found (the session, the job) declares the same dependency again;
FastAPI runs it once per request.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gravel.errors import StorageFullError
from gravel.service.api_errors import ApiError
from gravel.service.auth import token_matches
from gravel.service.container import service_of

__all__ = ["JobRow", "SessionRow", "admin_scheme", "job_of", "require_admin", "session_of", "session_scheme"]

log = logging.getLogger("gravel.service")

# auto_error=False: a missing token gets the service's own 401 message, not FastAPI's 403.
admin_scheme = HTTPBearer(scheme_name="adminToken", auto_error=False,
                          description="The admin token (gravel serve --admin-token or GRAVEL_ADMIN_TOKEN)")
session_scheme = HTTPBearer(scheme_name="sessionToken", auto_error=False,
                            description="The token returned once when the session was opened")

AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(admin_scheme)]
SessionCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(session_scheme)]

TOUCH_EVERY_S = 60.0  # a session's idle clock is written at most this often


def _token(credentials: HTTPAuthorizationCredentials | None, needs: str) -> str:
    if credentials is None or not credentials.credentials.strip():
        raise ApiError(401, f"{needs} (Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"})
    return credentials.credentials.strip()


def require_admin(request: Request, credentials: AdminCredentials) -> None:
    token = _token(credentials, "model management needs the admin token")
    if not token_matches(token, service_of(request).admin_hash):
        raise ApiError(403, "wrong admin token")


def _check_session(request: Request, sid: str, token: str) -> dict[str, Any]:
    svc = service_of(request)
    session = svc.store.get_session(sid)
    if session is None:
        raise ApiError(404, f"unknown session {sid!r} (expired or deleted?); open a new one")
    if not token_matches(token, session["token_hash"]):
        raise ApiError(403, "this token does not belong to that session")
    if time.time() - session["last_used"] > TOUCH_EVERY_S:
        try:  # a read must work on a full disk: the idle clock can wait for the next request
            svc.store.touch_session(sid)
        except (StorageFullError, sqlite3.Error) as exc:
            log.warning("could not touch session %s: %s", sid, exc)
    return session


def session_of(sid: str, request: Request, credentials: SessionCredentials) -> dict[str, Any]:
    """The session row of path parameter `sid`, if the request carries its token."""
    token = _token(credentials, "this call needs the session's token")
    return _check_session(request, sid, token)


def job_of(jid: str, request: Request, credentials: SessionCredentials) -> dict[str, Any]:
    """The job row of path parameter `jid`, if the request carries its session's token."""
    token = _token(credentials, "this call needs the token of the job's session")
    row = service_of(request).store.get_job(jid)
    if row is None:
        raise ApiError(404, f"unknown job {jid!r} (cancelled, or finished and expired; see the server's result TTL)")
    _check_session(request, row["session"], token)
    return row


# For routes that need the row their router's dependency found (FastAPI runs it once).
SessionRow = Annotated[dict[str, Any], Depends(session_of)]
JobRow = Annotated[dict[str, Any], Depends(job_of)]
