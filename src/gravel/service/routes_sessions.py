"""/v1 sessions, inference and jobs: everything a data owner's client calls with its token.

A session is one client's evaluation keys for one model. Keys and ciphertexts are checked
before anything is stored or queued: their declared length against the exact sizes measured at
deploy (before the body is read), their frame header as soon as it arrives, then the backend's
own deserializer. Malformed bytes get a 4xx that says what is wrong, and nothing stored is
touched. Opening a session needs no token, so key uploads are limited in number at once (503
with Retry-After beyond `max_key_loads`) and each is held to its model's exact key size.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from gravel.errors import GravelError, KeyMismatchError
from gravel.protocol import Kind, is_batch, unpack_batch
from gravel.protocol.batch import BATCH_MAGIC
from gravel.protocol.framing import HEADER_SIZE, check_header
from gravel.server.runner import parse_blob
from gravel.service.api_errors import ERRORS, ApiError, client_status
from gravel.service.auth import hash_token, new_token
from gravel.service.bodies import check_type, declared_length, receive_body
from gravel.service.container import Service, service_of
from gravel.service.dependencies import JobRow, SessionRow, job_of, session_of
from gravel.service.jobs import Job, QueueFull, StoredItems
from gravel.service.store import BlobWriter

__all__ = ["jobs_router", "keys_router", "session_router"]

log = logging.getLogger("gravel.service")

keys_router = APIRouter(prefix="/v1", tags=["sessions"], responses=ERRORS)
session_router = APIRouter(prefix="/v1/sessions/{sid}", tags=["sessions"], responses=ERRORS,
                           dependencies=[Depends(session_of)])
jobs_router = APIRouter(prefix="/v1/jobs/{jid}", tags=["jobs"], responses=ERRORS,
                        dependencies=[Depends(job_of)])

OCTETS = "application/octet-stream"
BINARY_BODY = {
    "requestBody": {"required": True, "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}
}
BINARY_ANSWER = {200: {"content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}}
RETRY_KEYS_S = "5"  # Retry-After when every key-load slot is taken
RETRY_QUEUE_S = "10"  # Retry-After when a session's queue is full
DISCONNECT_POLL_S = 0.5  # how often a waiting /infer checks that its client is still there


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


@keys_router.post(
    "/models/{name}/sessions",
    response_model=SessionCreated,
    status_code=201,
    summary="Open a session: upload the client's evaluation keys for a model",
    description="Body: framed evaluation keys (`SecretKeys.evaluation_keys()`; for a CKKS model the "
    "public context, `CkksSecretKeys.evaluation_keys()`), streamed, of exactly the size the model "
    "describes (`keys_bytes`; for a CKKS model at most that). The token in the answer is shown once; keep it to "
    "use the session. 503 with Retry-After when the server is checking too many uploads at once.",
    openapi_extra=BINARY_BODY,
)
async def open_session(name: str, request: Request) -> SessionCreated:
    svc = service_of(request)
    model = svc.model_row(name)
    check_type(request, OCTETS)
    ckks = _is_ckks(model)
    # TFHE keys have one exact size; CKKS keys (compressed, one or both packings) at most a bound
    bound: int | None = model["keys_bytes"] if ckks else None
    expected: int | None = None if ckks else model["keys_bytes"]
    limit = svc.config.max_key_bytes
    if expected is not None and expected > limit:
        raise ApiError(413, f"{name}'s evaluation keys are {expected} bytes, over this server's limit of {limit}")
    declared = declared_length(request, limit, "evaluation keys")
    if bound is not None:
        if declared is not None and declared > bound:
            raise ApiError(413, f"evaluation keys: the body declares {declared} bytes, and {name}'s CKKS evaluation "
                                f"keys take at most {bound} bytes (keys of another model?)")
        limit = min(limit, bound)
    if expected is not None and declared is not None and declared != expected:
        raise ApiError(413 if declared > expected else 400,
                       f"evaluation keys: the body declares {declared} bytes, and {name}'s evaluation keys are "
                       f"exactly {expected} bytes (keys of another model, or cut short?)")
    if not svc.key_loads.acquire(blocking=False):
        raise ApiError(503, "the server is receiving as many key uploads as it takes at once; retry shortly",
                       {"Retry-After": RETRY_KEYS_S})
    try:
        digest = bytes.fromhex(model["digest"])
        upload = await receive_body(
            request, svc.store, expected or limit, "evaluation keys", svc.config.body_timeout_s,
            head=(HEADER_SIZE, lambda head: _header(head, Kind.EVALUATION_KEYS, digest)),
            limit_reason=(f"{name}'s evaluation keys ({expected} bytes)" if expected else
                          f"{name}'s CKKS evaluation keys (at most {bound} bytes)" if bound else None),
        )
        try:
            if expected is not None and upload.size != expected:
                raise ApiError(400, f"evaluation keys: {upload.size} bytes, and {name}'s evaluation keys are "
                                    f"exactly {expected} bytes (cut short?)")
            await run_in_threadpool(_check_keys, upload, model)
            sid, token = "s_" + secrets.token_hex(16), new_token()
            with svc.store.lock:
                if svc.store.get_model(name) is None:
                    raise ApiError(404, f"model {name!r} was deleted during the upload")
                svc.store.adopt(upload)
                svc.store.add_session(sid, name, hash_token(token), upload.blob)
        finally:
            upload.discard()
    finally:
        svc.key_loads.release()
    svc.metrics.sessions.set(svc.store.count_sessions())
    return SessionCreated(session=sid, token=token, model=name, expires_after_idle_s=svc.config.session_ttl_s)


@session_router.get("", response_model=SessionInfo, summary="Describe a session (its token)")
def describe_session(sid: str, request: Request, session: SessionRow) -> SessionInfo:
    svc = service_of(request)
    return SessionInfo(session=sid, model=session["model"], created=session["created"],
                       last_used=session["last_used"], keys_bytes=session["keys_bytes"],
                       expires_after_idle_s=svc.config.session_ttl_s)


@session_router.delete("", status_code=204, summary="Close a session: cancel its jobs, delete its keys")
def close_session(sid: str, request: Request) -> Response:
    svc = service_of(request)
    svc.runner.cancel_session(sid)
    svc.store.delete_session(sid)
    svc.engine.drop_session(sid)
    svc.metrics.sessions.set(svc.store.count_sessions())
    return Response(status_code=204)


@session_router.post(
    "/infer",
    summary="Encrypted inference: input ciphertext in, output ciphertext out (or a batch in, a batch out)",
    description="Waits for the result and keeps nothing; a client that disconnects cancels it. For long "
    "work that must survive a server restart, use POST /v1/sessions/{sid}/jobs.",
    openapi_extra=BINARY_BODY,
    responses=BINARY_ANSWER,
    response_class=Response,
)
async def infer(sid: str, request: Request, session: SessionRow) -> Response:
    svc = service_of(request)
    check_type(request, OCTETS)
    model = svc.model_row(session["model"])
    upload = await _receive_inputs(request, svc, session, model, "input ciphertext")
    try:
        items, batch = await run_in_threadpool(_check_inputs, upload, model, "input batch", svc, session)
    finally:
        upload.discard()
    job = svc.make_job(session, model, items, persisted=False, batch=batch)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    job.notify = lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
    _submit(svc, job)
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
            if not done.done() and await request.is_disconnected():
                svc.runner.cancel(job.id)  # frees the slot: nobody is waiting for this answer
                return Response(status_code=499)  # "client closed request"; never reaches anyone
    finally:
        if not done.done():
            svc.runner.cancel(job.id)
    if job.status == "done":
        return Response(job.result, media_type=OCTETS)
    raise _failure(job.status, job.error, job.error_status, "inference")


@session_router.post(
    "/jobs",
    response_model=JobInfo,
    status_code=202,
    summary="Queue an inference job: one input ciphertext or a batch (gravel.protocol.pack_batch)",
    description="Acknowledged once stored: a server restart re-queues it. Poll GET /v1/jobs/{job}. "
    "429 with Retry-After when the session's queue is full.",
    openapi_extra=BINARY_BODY,
)
async def submit_job(sid: str, request: Request, session: SessionRow) -> JobInfo:
    svc = service_of(request)
    check_type(request, OCTETS)
    model = svc.model_row(session["model"])
    upload = await _receive_inputs(request, svc, session, model, "job input")
    try:
        items, batch = await run_in_threadpool(_check_inputs, upload, model, "job input", svc, session)
        stored = StoredItems(svc.store, upload.blob.sha, len(items), batch)
        del items  # checked; the job reads them from the store as they run
        job = svc.make_job(session, model, stored, persisted=True, batch=batch)
        with svc.store.lock:
            svc.store.adopt(upload)
            svc.store.add_job(job.id, sid, len(stored), upload.blob.sha)
    finally:
        upload.discard()
    try:
        _submit(svc, job)
    except ApiError:
        svc.store.delete_job(job.id)  # refused after all (a concurrent submission took the room)
        raise
    svc.metrics.queue_depth.set(svc.runner.depth)
    return _job_info(svc, job.id, sid)


@jobs_router.get("", response_model=JobInfo, summary="A job's status and progress (its session's token)")
def job_status(jid: str, request: Request, row: JobRow) -> JobInfo:
    return _job_info(service_of(request), jid, row["session"])


@jobs_router.get(
    "/result",
    summary="A finished job's output: one output ciphertext, or a batch for a batch job",
    responses=BINARY_ANSWER,
    response_class=Response,
)
def job_result(jid: str, request: Request, row: JobRow) -> Response:
    svc = service_of(request)
    live = svc.runner.live(jid)
    status = live.status if live is not None else row["status"]
    if status == "failed":
        error, code = (live.error, live.error_status) if live is not None else (row["error"], row["error_status"])
        raise _failure("failed", error, code, f"job {jid}")
    if status != "done" or live is not None:
        raise ApiError(409, f"job {jid} is {status}; poll GET /v1/jobs/{jid} until it is done")
    data = svc.store.read_blob(row["result_sha"])
    try:  # for the expiry grace only: a read must work on a full disk
        svc.store.mark_fetched(jid)
    except Exception as exc:  # noqa: BLE001 - the result is served all the same
        log.warning("job %s: fetch time not recorded: %s", jid, exc)
    return Response(data, media_type=OCTETS)


@jobs_router.delete("", status_code=204, summary="Cancel a job (queued or running) or drop its result")
def delete_job(jid: str, request: Request) -> Response:
    svc = service_of(request)
    svc.runner.cancel(jid)
    svc.store.delete_job(jid)
    return Response(status_code=204)


# -- helpers -----------------------------------------------------------------------------------
def _header(head: bytes, kind: Kind, digest: bytes) -> None:
    try:
        check_header(head, kind, digest, kind.label)
    except KeyMismatchError as exc:
        raise ApiError(400, str(exc)) from None


def _is_ckks(model: dict[str, Any]) -> bool:
    return model["manifest"]["backend"]["name"] == "ckks"


def _check_keys(upload: BlobWriter, model: dict[str, Any]) -> None:
    """Parse the uploaded keys with the backend's deserializer, reading the payload once
    (the header was checked as it streamed in): one copy of the keys in memory, not three.
    CKKS keys are also checked against the model: no secret key, its parameters, and every
    rotation of at least one packing."""
    if _is_ckks(model):
        from gravel.service.ckks_runner import check_ckks_keys

        try:
            check_ckks_keys(lambda: upload.read(HEADER_SIZE), model["manifest"])
        except GravelError as exc:
            if client_status(exc) is None:
                raise
            raise ApiError(400, f"evaluation keys: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - TenSEAL/SEAL on hostile bytes
            raise ApiError(400, f"evaluation keys: corrupt or truncated CKKS public context ({exc})") from None
        return
    from concrete import fhe

    payload = upload.read(HEADER_SIZE)
    try:
        fhe.EvaluationKeys.deserialize(payload)
    except Exception as exc:  # noqa: BLE001 - the backend raises RuntimeError and others
        raise ApiError(400, f"evaluation keys: corrupt or truncated ({exc})") from None


def _batch_count(size: int, input_bytes: int) -> int | None:
    """How many items a batch body of `size` bytes holds, if inputs are `input_bytes` each."""
    items, rest = divmod(size - 8, 8 + input_bytes)
    return items if rest == 0 and items >= 1 else None


async def _receive_inputs(request: Request, svc: Service, session: dict, model: dict, what: str) -> BlobWriter:
    """The body, streamed to a temporary file. Refused before it is read when its declared
    length is over what a full quota of this model's inputs can take, or when the items it
    declares would overflow the session's quota; refused on its first bytes when they are not
    an input ciphertext of this model (nor a batch)."""
    size: int | None = model["input_bytes"]
    quota = svc.config.max_session_items
    limit = svc.config.max_input_bytes if size is None else min(svc.config.max_input_bytes, 8 + quota * (8 + size))
    declared = declared_length(request, limit, what)
    if size is not None and declared is not None:
        count = 1 if declared == size else _batch_count(declared, size)
        if count is not None:
            _check_quota(svc, session["id"], count)
    digest = bytes.fromhex(model["digest"])

    def head_check(head: bytes) -> None:
        if head[:4] != BATCH_MAGIC:
            _header(head, Kind.INPUT_CIPHERTEXT, digest)

    return await receive_body(request, svc.store, limit, what, svc.config.body_timeout_s,
                              head=(HEADER_SIZE, head_check))


def _check_inputs(upload: BlobWriter, model: dict[str, Any], what: str, svc: Service,
                  session: dict[str, Any]) -> tuple[list[bytes], bool]:
    """The body's input ciphertexts (one, or a batch), each checked (exact size, frame,
    program digest, the backend's deserializer) before anything is queued. The body is
    mapped, not read, so only the items themselves are copied into memory. A CKKS input is
    checked against the session's keys by the engine (the key set it was made under, its
    packing, level and scale): one CKKS input may hold a whole SIMD batch of images."""
    size: int | None = model["input_bytes"]
    digest = bytes.fromhex(model["digest"])
    with open(upload.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        batch = is_batch(mapped)
        try:
            views = unpack_batch(memoryview(mapped), what) if batch else [memoryview(mapped)]
        except KeyMismatchError as exc:
            raise ApiError(400, str(exc)) from None
        items = [bytes(v) for v in views]
        del views
    finally:
        try:
            mapped.close()
        except BufferError:  # a view is still held by an error's traceback; collected with it
            pass
    for i, item in enumerate(items):
        where = f"item {i}: " if batch else ""
        if size is not None and len(item) != size:
            raise ApiError(400, f"{where}input ciphertext: {len(item)} bytes, and an input of {model['name']} is "
                                f"exactly {size} bytes (truncated, or encrypted for another function or model)")
        try:
            if _is_ckks(model):
                svc.engine.check_input(model["name"], svc.store.model_view(model), session["id"],
                                       lambda: svc.store.read_blob(session["keys_sha"]), item)
            else:
                parse_blob(item, Kind.INPUT_CIPHERTEXT, digest)
        except GravelError as exc:
            if client_status(exc) is None:
                raise
            raise ApiError(400, f"{where}{exc}") from None
    return items, batch


def _check_quota(svc: Service, sid: str, count: int) -> None:
    have, quota = svc.runner.queued_items(sid), svc.config.max_session_items
    if have + count > quota:
        raise ApiError(429, f"this session has {have} items queued and may have {quota}; {count} more "
                            "do not fit: wait for its jobs to progress, or send fewer items",
                       {"Retry-After": RETRY_QUEUE_S})


def _submit(svc: Service, job: Job) -> None:
    try:
        svc.runner.submit(job)
    except QueueFull as exc:
        raise ApiError(429, str(exc), {"Retry-After": RETRY_QUEUE_S}) from None


def _failure(status: str, error: str | None, code: int | None, what: str) -> ApiError:
    """The answer for work that did not finish: the input's fault 422, the server's 5xx."""
    if status == "cancelled":
        return ApiError(409, f"{what} cancelled (its session was closed, or the server is stopping)")
    if code is not None and code >= 500:
        return ApiError(code, f"{what} failed: {error}")
    return ApiError(422, f"{what} failed: {error}")


def _job_info(svc: Service, jid: str, sid: str) -> JobInfo:
    live = svc.runner.live(jid)
    if live is not None:
        return JobInfo(job=jid, session=sid, status=live.status, items=len(live.items), done=live.done,
                       progress=round(live.progress, 4), error=live.error if live.status == "failed" else None)
    row = svc.store.get_job(jid)
    if row is None:
        raise ApiError(404, f"unknown job {jid!r}")
    progress = 1.0 if row["status"] in ("done", "failed") else row["done"] / max(1, row["items"])
    return JobInfo(job=jid, session=sid, status=row["status"], items=row["items"], done=row["done"],
                   progress=progress, error=row["error"])
