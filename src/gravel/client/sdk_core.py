"""The SDK's one core: every request and every step of every operation, and no I/O.

Each operation is a *flow*, a generator that yields steps and receives their results, as
httpx's `auth_flow` yields requests and receives responses:

    response = yield Request("GET", "/v1/models")        # the driver sends it
    keys = yield Compute(cache.keys, (model,))            # CPU work: keygen, encrypt, decrypt
    yield Sleep(0.25)                                      # between polls of a job

`Client` drives flows with blocking calls and `AsyncClient` with awaited ones (CPU work in a
worker thread, so the event loop stays free). An error raised by a step is thrown into the flow
at its `yield`, where the flow may handle it (a session the server forgot) or let it reach the
caller. The clients hold no logic of their own, so the two cannot drift apart again.

Errors are split by whose fault they are: no answer at all is `ServerUnreachableError`; an
answer with an error status, or one the SDK cannot read, is `ServerAnsweredError`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar
from urllib.parse import quote

import numpy as np

from gravel.client.cache import ModelCache, default_cache_dir
from gravel.client.model import ClientModel, SecretKeys
from gravel.errors import InputError, ServerAnsweredError, ServerUnreachableError
from gravel.protocol import is_batch, pack_batch, unpack_batch
from gravel.protocol.batch import MAX_BATCH
from gravel.protocol.manifest import MANIFEST, load_manifest

__all__ = [
    "CHUNK",
    "OCTETS",
    "Answer",
    "BaseClient",
    "BaseSession",
    "Compute",
    "Flow",
    "Request",
    "SessionParts",
    "Sleep",
    "Step",
    "answered_error",
    "artifact_archive",
    "as_image",
    "checked",
    "decrypt_all",
    "encrypt_batch",
    "json_of",
    "progress_bar",
    "resume",
    "unreachable_error",
    "upload_chunks",
]

OCTETS = "application/octet-stream"
CHUNK = 1 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


# -- steps ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One HTTP request, described; `upload` names a body to stream in chunks with a progress
    bar (keys and artifacts are tens to thousands of megabytes)."""

    method: str
    path: str
    token: str | None = None
    body: bytes | None = None
    content_type: str | None = None
    upload: str | None = None
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.content_type:
            headers["Content-Type"] = self.content_type
        if self.upload is not None and self.body is not None:
            headers["Content-Length"] = str(len(self.body))  # streamed, yet not chunked encoding
        return headers


@dataclass(frozen=True)
class Compute:
    """CPU-bound work (key generation, encryption, decryption): the async driver runs it in a
    thread, the sync one in place."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Request | Compute | Sleep
Flow = Generator[Step, Any, T]


class Answer(Protocol):
    """What a flow receives for a Request: an HTTP response (httpx's, read in full)."""

    status_code: int
    content: bytes
    text: str

    def json(self) -> Any: ...


def resume(flow: Flow[T], result: Any = None, error: BaseException | None = None) -> tuple[Step | None, Any]:
    """Send a step's result into `flow`, or throw the step's error into it.

    Returns (next step, None) while the flow runs, (None, its return value) once it is done;
    an error the flow does not handle propagates. Both drivers loop on this."""
    try:
        step = flow.throw(error) if error is not None else flow.send(result)
    except StopIteration as stop:
        return None, stop.value
    return step, None


# -- answers ----------------------------------------------------------------------------------
def answered_error(response: Answer) -> ServerAnsweredError:
    """The error for an answer with an error status, carrying the server's own explanation."""
    try:
        body = response.json()
        detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
    except ValueError:  # not JSON: a proxy's HTML page, say
        detail = response.text[:200]
    return ServerAnsweredError(f"server answered {response.status_code}: {detail}", response.status_code)


def checked(response: Answer) -> Answer:
    if response.status_code >= 400:
        raise answered_error(response)
    return response


def unreachable_error(url: str, exc: Exception) -> ServerUnreachableError:
    """The error for a request that got no answer (httpx's TransportError and its kin)."""
    if "timeout" in type(exc).__name__.lower():
        return ServerUnreachableError(f"no answer from the Gravel server at {url} in time "
                                      f"({type(exc).__name__}: {exc}); it may be busy or gone")
    return ServerUnreachableError(f"cannot reach the Gravel server at {url}: {exc or type(exc).__name__}")


def json_of(response: Answer, *fields: str) -> dict[str, Any]:
    """The JSON object of a successful answer, with `fields` present; anything else is the
    server's (or a proxy's) fault, reported as such instead of a KeyError or a parse error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServerAnsweredError(f"server answered {response.status_code} with a body that is not a JSON "
                                  f"object: {response.text[:120]!r} (is this URL a Gravel server?)",
                                  response.status_code)
    missing = [f for f in fields if f not in body]
    if missing:
        raise ServerAnsweredError(f"server answered {response.status_code} without {', '.join(missing)} "
                                  "(a server of another Gravel version?)", response.status_code)
    return body


# -- local work -------------------------------------------------------------------------------
def as_image(x: Any) -> np.ndarray:
    """A numpy array as is; a PIL image as 8-bit grey levels (the model checks the shape)."""
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL.Image.Image, without importing PIL
        return np.asarray(x.convert("L"), dtype=np.uint8)
    return np.asarray(x)


def artifact_archive(artifact: str | Path) -> bytes:
    """The artifact directory as an uncompressed tar (its files are already compressed)."""
    manifest = load_manifest(artifact, role="all", backends=("concrete", "ckks"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in (MANIFEST, *manifest.client_files, *manifest.server_files):
            tar.add(manifest.path(name), arcname=f"{manifest.name}.gravel/{name}")
    return buf.getvalue()


def decrypt_all(model: ClientModel, keys: SecretKeys, data: bytes) -> list[np.ndarray]:
    """Class scores of every output in a server answer: one ciphertext, or a batch of them
    (a CKKS output of a SIMD batch holds every image's scores)."""
    if model.backend == "ckks":
        return model.decrypt_all(keys, data)  # type: ignore[attr-defined]
    items = unpack_batch(data, "result batch") if is_batch(data) else [data]
    return [model.decrypt(keys, item) for item in items]


def encrypt_batch(model: ClientModel, keys: SecretKeys, images: Sequence[Any]) -> bytes:
    """Several images as one batch body; the count is checked before any encryption."""
    if len(images) == 0:
        raise InputError("no images given: a batch needs at least one")
    if len(images) > MAX_BATCH:
        raise InputError(f"{len(images)} images: one batch holds at most {MAX_BATCH}; split them")
    if model.backend == "ckks":  # one input: the images SIMD-packed, one inference on the server
        return model.encrypt_batch(keys, [as_image(x) for x in images])  # type: ignore[attr-defined]
    return pack_batch([model.encrypt(keys, as_image(x)) for x in images])


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "B") -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False)


def upload_chunks(request: Request, progress: bool) -> Generator[bytes, None, None] | None:
    """The body of a streamed upload in CHUNK pieces, advancing a bar; None if not streamed.
    The driver closes it after the request, which closes the bar however the request ended."""
    if request.upload is None or request.body is None:
        return None
    return _chunks(request.body, progress_bar(progress, len(request.body), request.upload))


def _chunks(data: bytes, bar: Any) -> Iterator[bytes]:
    try:
        for i in range(0, len(data), CHUNK):
            piece = data[i : i + CHUNK]
            if bar is not None:
                bar.update(len(piece))
            yield piece
    finally:
        if bar is not None:
            bar.close()


def _labels(scores: list[np.ndarray]) -> list[int]:
    return [int(np.argmax(s)) for s in scores]


def _seg(text: str) -> str:
    """One path segment: a name cannot reach another route."""
    return quote(str(text), safe="")


# -- the client's flows -----------------------------------------------------------------------
class SessionParts(NamedTuple):
    model: ClientModel
    keys: SecretKeys
    sid: str
    token: str
    cache: ModelCache


class BaseClient:
    """Configuration and flows shared by `Client` and `AsyncClient`; sends nothing itself.

    `token` is the admin token, needed only for `deploy` and `delete_model` (default:
    GRAVEL_ADMIN_TOKEN). `cache_dir` keeps keys and sessions between runs (default
    ~/.cache/gravel). `progress=True` shows bars for uploads and jobs.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        timeout_s: float = 600.0,
        progress: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("GRAVEL_ADMIN_TOKEN")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.timeout_s = timeout_s
        self.progress = progress

    def _request_flow(self, method: str, path: str, token: str | None = None, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> Flow[Answer]:
        return (yield Request(method, path, token, content, extra_headers=dict(headers or {})))

    def _health_flow(self) -> Flow[dict[str, Any]]:
        return json_of((yield Request("GET", "/v1/health")))

    def _models_flow(self) -> Flow[list[dict[str, Any]]]:
        return json_of((yield Request("GET", "/v1/models")), "models")["models"]

    def _model_flow(self, name: str) -> Flow[dict[str, Any]]:
        return json_of((yield Request("GET", f"/v1/models/{_seg(name)}")))

    def _deploy_flow(self, artifact: str | Path) -> Flow[dict[str, Any]]:
        body = yield Compute(artifact_archive, (artifact,))
        answer = yield Request("POST", "/v1/models", self.token, body, "application/x-tar", upload="deploy")
        return json_of(answer)

    def _delete_model_flow(self, name: str) -> Flow[None]:
        yield Request("DELETE", f"/v1/models/{_seg(name)}", self.token)

    def _session_flow(self, model: str, reuse: bool) -> Flow[SessionParts]:
        """Keys from the cache (or new ones), the cached session if the server still has it,
        else a new session with only the evaluation keys uploaded."""
        info = yield from self._model_flow(model)
        digest = info.get("digest")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ServerAnsweredError(f"server described model {model!r} without a valid program digest "
                                      f"({str(digest)[:80]!r}); refusing to cache files for it", 200)
        cache = ModelCache(self.cache_dir, self.url, model, digest)
        if not cache.has_client_files():
            manifest = (yield Request("GET", f"/v1/models/{_seg(model)}/manifest")).content
            spec = (yield Request("GET", f"/v1/models/{_seg(model)}/client-spec")).content
            cache.save_client_files(manifest, spec)
        client_model = yield Compute(cache.client_model)
        keys = yield Compute(cache.keys, (client_model,))
        known = cache.session() if reuse else None
        if known is not None:
            try:
                yield Request("GET", f"/v1/sessions/{_seg(known['session'])}", known["token"])
                return SessionParts(client_model, keys, known["session"], known["token"], cache)
            except ServerAnsweredError as exc:
                if exc.status not in (403, 404):
                    raise
                cache.forget_session()
        body = yield Compute(keys.evaluation_keys)
        answer = json_of((yield Request("POST", f"/v1/models/{_seg(model)}/sessions", body=body,
                                        content_type=OCTETS, upload="evaluation keys")), "session", "token")
        cache.save_session(answer["session"], answer["token"])
        return SessionParts(client_model, keys, answer["session"], answer["token"], cache)


class BaseSession:
    """One client's session on one model: encrypt here, compute there, decrypt here.

    Holds the session's state and flows; `Session` and `AsyncSession` drive them through
    their client."""

    def __init__(self, client: BaseClient, model: ClientModel, keys: SecretKeys, sid: str, token: str,
                 cache: ModelCache) -> None:
        self.client = client
        self.model = model
        self.keys = keys
        self.id = sid
        self.token = token
        self._cache = cache

    def _encrypt_flow(self, x: Any) -> Flow[bytes]:
        return (yield Compute(self.model.encrypt, (self.keys, as_image(x))))

    def _infer_flow(self, ciphertext: bytes) -> Flow[bytes]:
        answer = yield Request("POST", f"/v1/sessions/{_seg(self.id)}/infer", self.token, ciphertext, OCTETS)
        return answer.content

    def _scores_flow(self, x: Any) -> Flow[np.ndarray]:
        out = yield from self._infer_flow((yield from self._encrypt_flow(x)))
        return (yield Compute(self.model.decrypt, (self.keys, out)))

    def _predict_flow(self, x: Any) -> Flow[int]:
        return int(np.argmax((yield from self._scores_flow(x))))

    def _predict_many_flow(self, images: Sequence[Any]) -> Flow[list[int]]:
        body = yield Compute(encrypt_batch, (self.model, self.keys, list(images)))
        out = yield from self._infer_flow(body)
        return _labels((yield Compute(decrypt_all, (self.model, self.keys, out))))

    def _submit_flow(self, images: Sequence[Any]) -> Flow[str]:
        body = yield Compute(encrypt_batch, (self.model, self.keys, list(images)))
        answer = yield Request("POST", f"/v1/sessions/{_seg(self.id)}/jobs", self.token, body, OCTETS)
        return str(json_of(answer, "job")["job"])

    def _status_flow(self, job: str) -> Flow[dict[str, Any]]:
        return json_of((yield Request("GET", f"/v1/jobs/{_seg(job)}", self.token)), "status")

    def _result_flow(self, job: str, poll_s: float,
                     on_progress: Callable[[dict[str, Any]], None] | None) -> Flow[list[np.ndarray]]:
        bar = None
        try:
            while (st := (yield from self._status_flow(job)))["status"] in ("queued", "running"):
                if self.client.progress and bar is None and "items" in st:
                    bar = progress_bar(True, st["items"], f"job {job[:10]}", unit="img")
                if bar is not None:
                    bar.n = st.get("done", 0)
                    bar.refresh()
                if on_progress is not None:
                    on_progress(st)
                yield Sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()
        data = (yield Request("GET", f"/v1/jobs/{_seg(job)}/result", self.token)).content
        yield Request("DELETE", f"/v1/jobs/{_seg(job)}", self.token)
        return (yield Compute(decrypt_all, (self.model, self.keys, data)))

    def _predict_batch_flow(self, images: Sequence[Any], poll_s: float) -> Flow[list[int]]:
        job = yield from self._submit_flow(images)
        return _labels((yield from self._result_flow(job, poll_s, None)))

    def _close_flow(self) -> Flow[None]:
        yield Request("DELETE", f"/v1/sessions/{_seg(self.id)}", self.token)
        self._cache.forget_session()
