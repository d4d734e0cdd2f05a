"""The SDK for asyncio programs: `AsyncClient` and `AsyncSession`, the same calls as
`Client` and `Session`, awaited. Key generation, encryption and decryption run in a thread so
the event loop stays free while the backend works."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gravel.client.cache import ModelCache, default_cache_dir
from gravel.client.model import ClientModel, SecretKeys
from gravel.client.remote import OCTETS, as_image, check, decrypt_all, progress_bar
from gravel.errors import ServiceError
from gravel.protocol import pack_batch

__all__ = ["AsyncClient", "AsyncSession"]


class AsyncClient:
    def __init__(self, url: str, token: str | None = None, cache_dir: str | Path | None = None,
                 timeout_s: float = 600.0, progress: bool = False) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("GRAVEL_ADMIN_TOKEN")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.progress = progress
        self._http = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def request(self, method: str, path: str, token: str | None = None, **kwargs):
        import httpx

        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            return check(await self._http.request(method, path, headers=headers, **kwargs))
        except httpx.TransportError as exc:
            raise ServiceError(f"cannot reach the Gravel server at {self.url}: {exc}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def models(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/models")).json()["models"]

    async def model(self, name: str) -> dict[str, Any]:
        return (await self.request("GET", f"/v1/models/{name}")).json()

    async def session(self, model: str, reuse: bool = True) -> AsyncSession:
        """As `Client.session`: cached keys and session where the server still has it."""
        info = await self.model(model)
        cache = ModelCache(self.cache_dir, self.url, model, info["digest"])
        if not cache.has_client_files():
            manifest = (await self.request("GET", f"/v1/models/{model}/manifest")).content
            spec = (await self.request("GET", f"/v1/models/{model}/client-spec")).content
            cache.save_client_files(manifest, spec)
        client_model = await asyncio.to_thread(cache.client_model)
        keys = await asyncio.to_thread(cache.keys, client_model)
        known = cache.session() if reuse else None
        if known is not None:
            try:
                await self.request("GET", f"/v1/sessions/{known['session']}", known["token"])
                return AsyncSession(self, client_model, keys, known["session"], known["token"], cache)
            except ServiceError as exc:
                if exc.status not in (403, 404):
                    raise
                cache.forget_session()
        body = await asyncio.to_thread(keys.evaluation_keys)
        bar = progress_bar(self.progress, len(body), "evaluation keys")
        answer = (await self.request("POST", f"/v1/models/{model}/sessions", content=body,
                                     headers={**OCTETS})).json()
        if bar is not None:
            bar.update(len(body))
            bar.close()
        cache.save_session(answer["session"], answer["token"])
        return AsyncSession(self, client_model, keys, answer["session"], answer["token"], cache)


class AsyncSession:
    def __init__(self, client: AsyncClient, model: ClientModel, keys: SecretKeys, sid: str, token: str,
                 cache: ModelCache) -> None:
        self.client = client
        self.model = model
        self.keys = keys
        self.id = sid
        self.token = token
        self._cache = cache

    async def encrypt(self, x: Any) -> bytes:
        return await asyncio.to_thread(self.model.encrypt, self.keys, as_image(x))

    async def scores(self, x: Any) -> np.ndarray:
        out = (await self.client.request("POST", f"/v1/sessions/{self.id}/infer", self.token,
                                         content=await self.encrypt(x), headers=OCTETS)).content
        return await asyncio.to_thread(self.model.decrypt, self.keys, out)

    async def predict(self, x: Any) -> int:
        return int(np.argmax(await self.scores(x)))

    async def predict_batch(self, images: Sequence[Any], poll_s: float = 0.25) -> list[int]:
        body = pack_batch([await self.encrypt(x) for x in images])
        job = (await self.client.request("POST", f"/v1/sessions/{self.id}/jobs", self.token, content=body,
                                         headers=OCTETS)).json()["job"]
        while (await self.client.request("GET", f"/v1/jobs/{job}", self.token)).json()["status"] in (
            "queued", "running"
        ):
            await asyncio.sleep(poll_s)
        data = (await self.client.request("GET", f"/v1/jobs/{job}/result", self.token)).content
        await self.client.request("DELETE", f"/v1/jobs/{job}", self.token)
        outs = await asyncio.to_thread(decrypt_all, self.model, self.keys, data)
        return [int(np.argmax(s)) for s in outs]

    async def close(self) -> None:
        await self.client.request("DELETE", f"/v1/sessions/{self.id}", self.token)
        self._cache.forget_session()
