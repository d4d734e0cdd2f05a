"""The SDK for asyncio programs: `AsyncClient` and `AsyncSession`, the same calls as
`Client` and `Session`, awaited.

Both drive the same flows of `gravel.client.sdk_core`; here every request is awaited and the
CPU work of a flow (key generation, encryption, decryption) runs in a worker thread, so the
event loop stays free while the backend works.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
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
    checked,
    resume,
    unreachable_error,
    upload_chunks,
)
from gravel.errors import GravelError

__all__ = ["AsyncClient", "AsyncSession"]

T = TypeVar("T")


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for piece in chunks:
        yield piece


class AsyncClient(BaseClient):
    """A connection to one Gravel server for asyncio code: `async with AsyncClient(url) as c`.

    Same arguments, methods and errors as `Client`; every method is a coroutine."""

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
        self._http = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    # -- driving flows ----------------------------------------------------------------------
    async def _drive(self, flow: Flow[T]) -> T:
        try:
            step, value = resume(flow)
            while step is not None:
                try:
                    result, error = await self._perform(step), None
                except GravelError as exc:
                    result, error = None, exc
                step, value = resume(flow, result, error)
            return value
        finally:
            flow.close()

    async def _perform(self, step: Step) -> Any:
        if isinstance(step, Request):
            return await self._send(step)
        if isinstance(step, Compute):
            return await asyncio.to_thread(step.fn, *step.args)
        await asyncio.sleep(step.seconds)
        return None

    async def _send(self, request: Request) -> Answer:
        import httpx

        chunks = upload_chunks(request, self.progress)
        try:
            response = await self._http.request(request.method, request.path, headers=request.headers(),
                                                content=request.body if chunks is None else _aiter(chunks))
        except httpx.TransportError as exc:
            raise unreachable_error(self.url, exc) from exc
        finally:
            if chunks is not None:
                chunks.close()
        return checked(response)

    # -- public -----------------------------------------------------------------------------
    async def request(self, method: str, path: str, token: str | None = None, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> Any:
        """Any endpoint, for what the SDK does not wrap; an error status raises as elsewhere."""
        return await self._drive(self._request_flow(method, path, token, content, headers))

    async def health(self) -> dict[str, Any]:
        return await self._drive(self._health_flow())

    async def models(self) -> list[dict[str, Any]]:
        return await self._drive(self._models_flow())

    async def model(self, name: str) -> dict[str, Any]:
        return await self._drive(self._model_flow(name))

    async def deploy(self, artifact: str | Path) -> dict[str, Any]:
        """Upload a compiled artifact directory (admin token); returns the model's description."""
        return await self._drive(self._deploy_flow(artifact))

    async def delete_model(self, name: str) -> None:
        await self._drive(self._delete_model_flow(name))

    async def session(self, model: str, reuse: bool = True) -> AsyncSession:
        """As `Client.session`: cached keys, and the cached session where the server still has it."""
        return AsyncSession(self, *await self._drive(self._session_flow(model, reuse)))

    async def close(self) -> None:
        await self._http.aclose()

    aclose = close  # httpx's name for it

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession(BaseSession):
    """As `Session`, awaited."""

    client: AsyncClient

    async def encrypt(self, x: Any) -> bytes:
        return await self.client._drive(self._encrypt_flow(x))

    async def infer(self, ciphertext: bytes) -> bytes:
        return await self.client._drive(self._infer_flow(ciphertext))

    async def scores(self, x: Any) -> np.ndarray:
        return await self.client._drive(self._scores_flow(x))

    async def predict(self, x: Any) -> int:
        return await self.client._drive(self._predict_flow(x))

    async def predict_many(self, images: Sequence[Any]) -> list[int]:
        return await self.client._drive(self._predict_many_flow(images))

    async def submit(self, images: Sequence[Any]) -> str:
        return await self.client._drive(self._submit_flow(images))

    async def status(self, job: str) -> dict[str, Any]:
        return await self.client._drive(self._status_flow(job))

    async def result(self, job: str, poll_s: float = 0.25,
                     on_progress: Callable[[dict[str, Any]], None] | None = None) -> list[np.ndarray]:
        return await self.client._drive(self._result_flow(job, poll_s, on_progress))

    async def predict_batch(self, images: Sequence[Any], poll_s: float = 0.25) -> list[int]:
        return await self.client._drive(self._predict_batch_flow(images, poll_s))

    async def close(self) -> None:
        await self.client._drive(self._close_flow())
