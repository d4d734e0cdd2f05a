"""The Python SDK for a Gravel server: `Client(url)`, `client.session(model).predict(x)`.

Keys are generated here and the secret key stays here (cached on disk, 0600). Only
`SecretKeys.evaluation_keys()` is ever uploaded: no function of this module takes a secret
key set to the network. Inputs are encrypted before they leave, outputs decrypted after.

Every operation is a flow of `gravel.client.sdk_core`; this module only performs its steps,
with blocking calls. `AsyncClient` drives the very same flows with awaited ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np

from gravel.client.sdk_core import (
    Answer,
    BaseClient,
    BaseSession,
    Compute,
    Flow,
    Request,
    Step,
    as_image,
    checked,
    resume,
    unreachable_error,
    upload_chunks,
)
from gravel.errors import GravelError

__all__ = ["Client", "Session", "as_image"]

T = TypeVar("T")


class Client(BaseClient):
    """A connection to one Gravel server.

    `token` is the admin token, needed only for `deploy` and `delete_model` (default:
    GRAVEL_ADMIN_TOKEN). `cache_dir` keeps keys and sessions between runs (default
    ~/.cache/gravel). `progress=True` shows bars for uploads and jobs. Errors: no answer is
    `ServerUnreachableError`, an error answer `ServerAnsweredError` (both `ServiceError`s).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        timeout_s: float = 600.0,
        progress: bool = False,
    ) -> None:
        import httpx

        super().__init__(url, token, cache_dir, timeout_s, progress)
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    # -- driving flows ----------------------------------------------------------------------
    def _drive(self, flow: Flow[T]) -> T:
        try:
            step, value = resume(flow)
            while step is not None:
                try:
                    result, error = self._perform(step), None
                except GravelError as exc:
                    result, error = None, exc
                step, value = resume(flow, result, error)
            return value
        finally:
            flow.close()

    def _perform(self, step: Step) -> Any:
        if isinstance(step, Request):
            return self._send(step)
        if isinstance(step, Compute):
            return step.fn(*step.args)
        time.sleep(step.seconds)
        return None

    def _send(self, request: Request) -> Answer:
        import httpx

        chunks = upload_chunks(request, self.progress)
        try:
            response = self._http.request(request.method, request.path, headers=request.headers(),
                                          content=request.body if chunks is None else chunks)
        except httpx.TransportError as exc:
            raise unreachable_error(self.url, exc) from exc
        finally:
            if chunks is not None:
                chunks.close()
        return checked(response)

    # -- public -----------------------------------------------------------------------------
    def request(self, method: str, path: str, token: str | None = None, content: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Any:
        """Any endpoint, for what the SDK does not wrap; an error status raises as elsewhere."""
        return self._drive(self._request_flow(method, path, token, content, headers))

    def health(self) -> dict[str, Any]:
        return self._drive(self._health_flow())

    def models(self) -> list[dict[str, Any]]:
        return self._drive(self._models_flow())

    def model(self, name: str) -> dict[str, Any]:
        return self._drive(self._model_flow(name))

    def deploy(self, artifact: str | Path) -> dict[str, Any]:
        """Upload a compiled artifact directory (admin token); returns the model's description."""
        return self._drive(self._deploy_flow(artifact))

    def delete_model(self, name: str) -> None:
        self._drive(self._delete_model_flow(name))

    def session(self, model: str, reuse: bool = True) -> Session:
        """A session on `model`: keys from the cache (or new ones), the cached session if the
        server still has it, else a new one with only the evaluation keys uploaded."""
        return Session(self, *self._drive(self._session_flow(model, reuse)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session(BaseSession):
    """One client's session on one model: encrypt here, compute there, decrypt here."""

    client: Client

    def encrypt(self, x: Any) -> bytes:
        return self.client._drive(self._encrypt_flow(x))

    def infer(self, ciphertext: bytes) -> bytes:
        """One round trip: an input ciphertext to the server, its output ciphertext back."""
        return self.client._drive(self._infer_flow(ciphertext))

    def scores(self, x: Any) -> np.ndarray:
        """Dequantized class scores of one image, computed on the server under encryption."""
        return self.client._drive(self._scores_flow(x))

    def predict(self, x: Any) -> int:
        """The predicted class of one image (numpy array or PIL image)."""
        return self.client._drive(self._predict_flow(x))

    def predict_many(self, images: Sequence[Any]) -> list[int]:
        """Several images in one request that waits for all of them (not kept by the server;
        for long batches prefer `predict_batch`, a job that survives a server restart)."""
        return self.client._drive(self._predict_many_flow(images))

    def submit(self, images: Sequence[Any]) -> str:
        """Queue a batch job; returns its id. The server keeps it across restarts."""
        return self.client._drive(self._submit_flow(images))

    def status(self, job: str) -> dict[str, Any]:
        return self.client._drive(self._status_flow(job))

    def result(self, job: str, poll_s: float = 0.25,
               on_progress: Callable[[dict[str, Any]], None] | None = None) -> list[np.ndarray]:
        """Wait for a job, fetch its result, drop it on the server, decrypt every item."""
        return self.client._drive(self._result_flow(job, poll_s, on_progress))

    def predict_batch(self, images: Sequence[Any], poll_s: float = 0.25) -> list[int]:
        """Several images as one job, with progress; returns their predicted classes."""
        return self.client._drive(self._predict_batch_flow(images, poll_s))

    def close(self) -> None:
        """Delete the session (and its keys) on the server; the local keys stay cached."""
        self.client._drive(self._close_flow())
