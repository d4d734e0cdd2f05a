"""/v1 sessions, inference and jobs: everything a data owner's client calls with its token.

A session is one client's evaluation keys for one model. Keys and ciphertexts are checked
(frame, program digest, the backend's own deserializer) before anything is stored or queued,
so malformed bytes get a 400 that says what is wrong, and nothing stored is touched.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from gravel.errors import KeyMismatchError
from gravel.protocol import Kind, is_batch, unpack_batch
from gravel.server.runner import parse_blob
from gravel.service.auth import hash_token, new_token
from gravel.service.state import ERRORS, ApiError, Service, check_type, read_body, service_of

router = APIRouter(prefix="/v1", tags=["sessions"], responses=ERRORS)

OCTETS = "application/octet-stream"
BINARY_BODY = {
    "requestBody": {"required": True, "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}
}
BINARY_ANSWER = {200: {"content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}}


class SessionCreated(BaseModel):
    session: str
    token: str
    model: str
    expires_after_idle_s: float


class SessionInfo(BaseModel):
    session: str
    model: str
    created: float
    last_used: float
    keys_bytes: int
    expires_after_idle_s: float


class JobInfo(BaseModel):
    job: str
    session: str
    status: str
    items: int
    done: int
    progress: float
    error: str | None = None


@router.post(
    "/models/{name}/sessions",
    response_model=SessionCreated,
    status_code=201,
    summary="Open a session: upload the client's evaluation keys for a model",
    description="Body: framed evaluation keys (`SecretKeys.evaluation_keys()`), streamed. The token "
    "in the answer is shown once; keep it to use the session.",
    openapi_extra=BINARY_BODY,
)
async def open_session(name: str, request: Request) -> SessionCreated:
    svc = service_of(request)
    model = svc.model_row(name)
    check_type(request, OCTETS)
    upload = await read_body(request, svc.store, svc.config.max_key_bytes, "evaluation keys")
    try:
        digest = bytes.fromhex(model["digest"])
        try:
            await run_in_threadpool(lambda: parse_blob(upload.read(), Kind.EVALUATION_KEYS, digest))
        except KeyMismatchError as exc:
            raise ApiError(400, str(exc)) from None
        sid, token = "s_" + secrets.token_hex(16), new_token()
        with svc.store.lock:
            if svc.store.get_model(name) is None:
                raise ApiError(404, f"model {name!r} was deleted during the upload")
            svc.store.adopt(upload)
            svc.store.add_session(sid, name, hash_token(token), upload.blob)
    finally:
        upload.discard()
    svc.metrics.sessions.set(svc.store.count_sessions())
    return SessionCreated(session=sid, token=token, model=name, expires_after_idle_s=svc.config.session_ttl_s)


@router.get("/sessions/{sid}", response_model=SessionInfo, summary="Describe a session (its token)")
def describe_session(sid: str, request: Request) -> SessionInfo:
    svc = service_of(request)
    s = svc.session_for(request, sid)
    return SessionInfo(session=sid, model=s["model"], created=s["created"], last_used=s["last_used"],
                       keys_bytes=s["keys_bytes"], expires_after_idle_s=svc.config.session_ttl_s)


@router.delete("/sessions/{sid}", status_code=204, summary="Close a session and delete its keys and jobs")
def close_session(sid: str, request: Request) -> Response:
    svc = service_of(request)
    svc.session_for(request, sid)
    svc.store.delete_session(sid)
    svc.engine.drop_session(sid)
    svc.metrics.sessions.set(svc.store.count_sessions())
    return Response(status_code=204)


@router.post(
    "/sessions/{sid}/infer",
    summary="Encrypted inference: input ciphertext in, output ciphertext out (or a batch in, a batch out)",
    description="Waits for the result and keeps nothing. For long work that must survive a server "
    "restart, use POST /v1/sessions/{sid}/jobs.",
    openapi_extra=BINARY_BODY,
    responses=BINARY_ANSWER,
    response_class=Response,
)
async def infer(sid: str, request: Request) -> Response:
    svc = service_of(request)
    session = svc.session_for(request, sid)
    check_type(request, OCTETS)
    data = await _small_body(request, svc, "input ciphertext")
    model, items, batch = await _parse_inputs(svc, session, data, "input batch")
    job = svc.make_job(session, model, items, persisted=False, batch=batch)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    job.notify = lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
    svc.runner.submit(job)
    await done
    if job.status != "done":
        raise ApiError(422, f"inference failed: {job.error}")
    return Response(job.result, media_type=OCTETS)


@router.post(
    "/sessions/{sid}/jobs",
    response_model=JobInfo,
    status_code=202,
    summary="Queue an inference job: one input ciphertext or a batch (gravel.protocol.pack_batch)",
    description="Acknowledged once stored: a server restart re-queues it. Poll GET /v1/jobs/{job}.",
    openapi_extra=BINARY_BODY,
)
async def submit_job(sid: str, request: Request) -> JobInfo:
    svc = service_of(request)
    session = svc.session_for(request, sid)
    check_type(request, OCTETS)
    upload = await read_body(request, svc.store, svc.config.max_input_bytes, "job input")
    try:
        data = await run_in_threadpool(upload.read)
        model, items, batch = await _parse_inputs(svc, session, data, "job input")
        job = svc.make_job(session, model, items, persisted=True, batch=batch)
        with svc.store.lock:
            svc.store.adopt(upload)
            svc.store.add_job(job.id, sid, len(items), upload.blob.sha)
    finally:
        upload.discard()
    svc.runner.submit(job)
    svc.metrics.queue_depth.set(svc.runner.depth)
    return _job_info(svc, job.id, sid)


@router.get("/jobs/{jid}", response_model=JobInfo, summary="A job's status and progress (its session's token)")
def job_status(jid: str, request: Request) -> JobInfo:
    svc = service_of(request)
    row = _job_row(svc, request, jid)
    return _job_info(svc, jid, row["session"])


@router.get(
    "/jobs/{jid}/result",
    summary="A finished job's output: one output ciphertext, or a batch for a batch job",
    responses=BINARY_ANSWER,
    response_class=Response,
)
def job_result(jid: str, request: Request) -> Response:
    svc = service_of(request)
    row = _job_row(svc, request, jid)
    if row["status"] == "failed":
        raise ApiError(422, f"job {jid} failed: {row['error']}")
    if row["status"] != "done":
        raise ApiError(409, f"job {jid} is {row['status']}; poll GET /v1/jobs/{jid} until it is done")
    data = svc.store.read_blob(row["result_sha"])
    svc.store.mark_fetched(jid)
    return Response(data, media_type=OCTETS)


@router.delete("/jobs/{jid}", status_code=204, summary="Cancel a job or drop its result")
def delete_job(jid: str, request: Request) -> Response:
    svc = service_of(request)
    _job_row(svc, request, jid)
    svc.runner.cancel(jid)
    svc.store.delete_job(jid)
    return Response(status_code=204)


# -- helpers -----------------------------------------------------------------------------------
async def _small_body(request: Request, svc: Service, what: str) -> bytes:
    upload = await read_body(request, svc.store, svc.config.max_input_bytes, what)
    try:
        return await run_in_threadpool(upload.read)
    finally:
        upload.discard()


async def _parse_inputs(svc: Service, session: dict, data: bytes, what: str) -> tuple[dict, list[bytes], bool]:
    """The session's model, and the body's input ciphertexts (one, or a batch), each checked
    (frame, program digest, the backend's deserializer) before anything is queued."""
    batch = is_batch(data)
    try:
        items = unpack_batch(data, what) if batch else [data]
    except KeyMismatchError as exc:
        raise ApiError(400, str(exc)) from None
    model = svc.model_row(session["model"])
    digest = bytes.fromhex(model["digest"])

    def check() -> None:
        for i, item in enumerate(items):
            try:
                parse_blob(item, Kind.INPUT_CIPHERTEXT, digest)
            except KeyMismatchError as exc:
                where = f"item {i}: " if len(items) > 1 else ""
                raise ApiError(400, f"{where}{exc}") from None

    await run_in_threadpool(check)
    return model, items, batch


def _job_row(svc: Service, request: Request, jid: str) -> dict:
    row = svc.store.get_job(jid)
    if row is None:
        raise ApiError(404, f"unknown job {jid!r} (finished results expire; see the server's result TTL)")
    svc.session_for(request, row["session"])
    return row


def _job_info(svc: Service, jid: str, sid: str) -> JobInfo:
    live = svc.runner.live(jid)
    if live is not None:
        return JobInfo(job=jid, session=sid, status=live.status, items=len(live.items), done=live.done,
                       progress=round(live.progress, 4))
    row = svc.store.get_job(jid)
    if row is None:
        raise ApiError(404, f"unknown job {jid!r}")
    progress = 1.0 if row["status"] in ("done", "failed") else row["done"] / max(1, row["items"])
    return JobInfo(job=jid, session=sid, status=row["status"], items=row["items"], done=row["done"],
                   progress=progress, error=row["error"])

