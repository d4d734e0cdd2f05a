"""The SDK's disk cache: per server and model, the client's files, keys and session.

    CACHE/<server>/<model>/<program digest>/
        manifest.json, client spec         fetched from the server, checked against each other
                                           (client.specs.json for TFHE, client.ckks.json for CKKS)
        secret.keys                        this client's SECRET key set (0600)
        session.json                       session id and token on that server (0600)

A returning client finds its keys and session here and does not upload its evaluation keys
again. A model redeployed under the same name has another digest, hence another folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from gravel.client.atomic import write_atomic
from gravel.client.model import load_client_model, load_secret_keys
from gravel.errors import ServerAnsweredError
from gravel.protocol.manifest import BACKEND_FILES, MANIFEST

__all__ = ["ModelCache", "default_cache_dir"]


def default_cache_dir() -> Path:
    base = os.environ.get("GRAVEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gravel"
    )
    return Path(base)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:48]


class ModelCache:
    """One model of one server, as this client knows it."""

    def __init__(self, root: Path, url: str, model: str, digest: str) -> None:
        server = f"{_slug(url.split('://')[-1])}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
        self.dir = Path(root) / server / _slug(model) / digest[:16]
        self.digest = digest

    def _spec_name(self, manifest: bytes) -> str:
        """The client spec's file name for the backend the manifest names."""
        try:
            backend = json.loads(manifest).get("backend", {}).get("name", "concrete")
        except (ValueError, AttributeError):
            backend = None
        if backend not in BACKEND_FILES:
            raise ServerAnsweredError(f"the server's manifest for this model names no backend this client "
                                      f"reads ({str(backend)[:40]!r})", 200)
        return BACKEND_FILES[backend][0][0]

    def has_client_files(self) -> bool:
        path = self.dir / MANIFEST
        try:
            return path.is_file() and (self.dir / self._spec_name(path.read_bytes())).is_file()
        except ServerAnsweredError:
            return False

    def save_client_files(self, manifest: bytes, spec: bytes) -> None:
        write_atomic(self.dir / self._spec_name(manifest), spec)
        write_atomic(self.dir / MANIFEST, manifest)

    def client_model(self) -> Any:
        """The model's client (`ClientModel` or `CkksClientModel`), from the cached files."""
        model = load_client_model(self.dir)
        if model.digest.hex() != self.digest:
            # The server answered, but with files that contradict each other: its fault, not ours.
            raise ServerAnsweredError(f"the server's client spec for this model does not match its digest "
                                      f"{self.digest[:16]}...; refusing to encrypt for it", 200)
        return model

    def keys(self, model: Any) -> Any:
        """This client's keys for the model: loaded if cached, else generated and saved (0600)."""
        path = self.dir / "secret.keys"
        if path.is_file():
            return load_secret_keys(path, model)
        keys = model.keygen()
        keys.save(path)
        return keys

    def session(self) -> dict[str, Any] | None:
        path = self.dir / "session.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return data if {"session", "token"} <= data.keys() else None
        except (OSError, ValueError):
            return None

    def save_session(self, session: str, token: str) -> None:
        write_atomic(self.dir / "session.json", json.dumps({"session": session, "token": token}).encode(), mode=0o600)

    def forget_session(self) -> None:
        (self.dir / "session.json").unlink(missing_ok=True)


