"""The Python SDK for a Gravel server: `Client(url)`, `client.session(model).predict(x)`.

Keys are generated here and the secret key stays here (cached on disk, 0600). Only
`SecretKeys.evaluation_keys()` is ever uploaded: no function of this module takes a secret
key set to the network. Inputs are encrypted before they leave, outputs decrypted after.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from gravel.client.cache import ModelCache, default_cache_dir
from gravel.client.model import ClientModel, SecretKeys
from gravel.errors import ServiceError
from gravel.protocol import is_batch, pack_batch, unpack_batch
from gravel.protocol.manifest import CLIENT_FILES, MANIFEST, SERVER_FILES, load_manifest

__all__ = ["Client", "Session", "as_image"]

OCTETS = {"Content-Type": "application/octet-stream"}
CHUNK = 1 << 20


def as_image(x: Any) -> np.ndarray:
    """A numpy array as is; a PIL image as 8-bit grey levels (the model checks the shape)."""
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL.Image.Image, without importing PIL
        return np.asarray(x.convert("L"), dtype=np.uint8)
    return np.asarray(x)


def error_of(response) -> ServiceError:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text[:200]
    return ServiceError(f"server answered {response.status_code}: {detail}", response.status_code)


def check(response):
    if response.status_code >= 400:
        raise error_of(response)
    return response


def artifact_archive(artifact: str | Path) -> bytes:
    """The artifact directory as an uncompressed tar (its files are already compressed)."""
    manifest = load_manifest(artifact, role="all")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in (MANIFEST, *CLIENT_FILES, *SERVER_FILES):
            tar.add(manifest.path(name), arcname=f"{manifest.name}.gravel/{name}")
    return buf.getvalue()


def decrypt_all(model: ClientModel, keys: SecretKeys, data: bytes) -> list[np.ndarray]:
    """Class scores of every output in a server answer: one ciphertext, or a batch of them."""
    items = unpack_batch(data, "result batch") if is_batch(data) else [data]
    return [model.decrypt(keys, item) for item in items]


def chunks(data: bytes, bar) -> Iterator[bytes]:
    for i in range(0, len(data), CHUNK):
        piece = data[i : i + CHUNK]
        if bar is not None:
            bar.update(len(piece))
        yield piece


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "B"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False)


class Client:
    """A connection to one Gravel server.

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
        import httpx

        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("GRAVEL_ADMIN_TOKEN")
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.progress = progress
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    # -- plumbing ---------------------------------------------------------------------------
    def request(self, method: str, path: str, token: str | None = None, **kwargs):
        import httpx

        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            return check(self._http.request(method, path, headers=headers, **kwargs))
        except httpx.TransportError as exc:
            raise ServiceError(f"cannot reach the Gravel server at {self.url}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- models -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/health").json()

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models").json()["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/models/{name}").json()

    def deploy(self, artifact: str | Path) -> dict[str, Any]:
        """Upload a compiled artifact directory (admin token); returns the model's description."""
        body = artifact_archive(artifact)
        bar = progress_bar(self.progress, len(body), "deploy")
        try:
            return self.request(
                "POST", "/v1/models", self.token, content=chunks(body, bar),
                headers={"Content-Type": "application/x-tar", "Content-Length": str(len(body))},
            ).json()
        finally:
            if bar is not None:
                bar.close()

    def delete_model(self, name: str) -> None:
        self.request("DELETE", f"/v1/models/{name}", self.token)

    # -- sessions ---------------------------------------------------------------------------
    def session(self, model: str, reuse: bool = True) -> Session:
        """A session on `model`: keys from the cache (or new ones), the cached session if the
        server still has it, else a new one with only the evaluation keys uploaded."""
        info = self.model(model)
        cache = ModelCache(self.cache_dir, self.url, model, info["digest"])
        if not cache.has_client_files():
            cache.save_client_files(
                self.request("GET", f"/v1/models/{model}/manifest").content,
                self.request("GET", f"/v1/models/{model}/client-spec").content,
            )
        client_model = cache.client_model()
        keys = cache.keys(client_model)
        known = cache.session() if reuse else None
        if known is not None:
            try:
                self.request("GET", f"/v1/sessions/{known['session']}", known["token"])
                return Session(self, client_model, keys, known["session"], known["token"], cache)
            except ServiceError as exc:
                if exc.status not in (403, 404):
                    raise
                cache.forget_session()
        sid, token = self._upload_keys(model, keys)
        cache.save_session(sid, token)
        return Session(self, client_model, keys, sid, token, cache)

    def _upload_keys(self, model: str, keys: SecretKeys) -> tuple[str, str]:
        body = keys.evaluation_keys()
        bar = progress_bar(self.progress, len(body), "evaluation keys")
        try:
            answer = self.request(
                "POST", f"/v1/models/{model}/sessions", content=chunks(body, bar),
                headers={**OCTETS, "Content-Length": str(len(body))},
            ).json()
        finally:
            if bar is not None:
                bar.close()
        return answer["session"], answer["token"]


class Session:
    """One client's session on one model: encrypt here, compute there, decrypt here."""

    def __init__(self, client: Client, model: ClientModel, keys: SecretKeys, sid: str, token: str,
                 cache: ModelCache) -> None:
        self.client = client
        self.model = model
        self.keys = keys
        self.id = sid
        self.token = token
        self._cache = cache

    def encrypt(self, x: Any) -> bytes:
        return self.model.encrypt(self.keys, as_image(x))

    def infer(self, ciphertext: bytes) -> bytes:
        """One round trip: an input ciphertext to the server, its output ciphertext back."""
        return self.client.request("POST", f"/v1/sessions/{self.id}/infer", self.token,
                                   content=ciphertext, headers=OCTETS).content

    def scores(self, x: Any) -> np.ndarray:
        """Dequantized class scores of one image, computed on the server under encryption."""
        return self.model.decrypt(self.keys, self.infer(self.encrypt(x)))

    def predict(self, x: Any) -> int:
        """The predicted class of one image (numpy array or PIL image)."""
        return int(np.argmax(self.scores(x)))

    def predict_many(self, images: Sequence[Any]) -> list[int]:
        """Several images in one request that waits for all of them (not kept by the server;
        for long batches prefer `predict_batch`, a job that survives a server restart)."""
        out = self.infer(pack_batch([self.encrypt(x) for x in images]))
        return [int(np.argmax(s)) for s in decrypt_all(self.model, self.keys, out)]

    def submit(self, images: Sequence[Any]) -> str:
        """Queue a batch job; returns its id. The server keeps it across restarts."""
        body = pack_batch([self.encrypt(x) for x in images])
        return self.client.request("POST", f"/v1/sessions/{self.id}/jobs", self.token, content=body,
                                   headers=OCTETS).json()["job"]

    def status(self, job: str) -> dict[str, Any]:
        return self.client.request("GET", f"/v1/jobs/{job}", self.token).json()

    def result(self, job: str, poll_s: float = 0.25, on_progress: Callable[[dict], None] | None = None) -> list[np.ndarray]:
        """Wait for a job, fetch its result, drop it on the server, decrypt every item."""
        bar = None
        while (st := self.status(job))["status"] in ("queued", "running"):
            if self.client.progress and bar is None:
                bar = progress_bar(True, st["items"], f"job {job[:10]}", unit="img")
            if bar is not None:
                bar.n = st["done"]
                bar.refresh()
            if on_progress is not None:
                on_progress(st)
            time.sleep(poll_s)
        if bar is not None:
            bar.close()
        data = self.client.request("GET", f"/v1/jobs/{job}/result", self.token).content
        self.client.request("DELETE", f"/v1/jobs/{job}", self.token)
        return decrypt_all(self.model, self.keys, data)

    def predict_batch(self, images: Sequence[Any]) -> list[int]:
        """Several images as one job, with progress; returns their predicted classes."""
        return [int(np.argmax(s)) for s in self.result(self.submit(images))]

    def close(self) -> None:
        """Delete the session (and its keys) on the server; the local keys stay cached."""
        self.client.request("DELETE", f"/v1/sessions/{self.id}", self.token)
        self._cache.forget_session()
