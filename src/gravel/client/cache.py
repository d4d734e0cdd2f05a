"""The SDK's disk cache: per server and model, the client's files, keys and session.

    CACHE/<server>/<model>/<program digest>/
        manifest.json, client.specs.json   fetched from the server, checked against each other
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
import tempfile
from pathlib import Path
from typing import Any

from gravel.client.model import ClientModel, SecretKeys
from gravel.errors import ServerAnsweredError
from gravel.protocol.manifest import CLIENT_FILES, MANIFEST

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

    def has_client_files(self) -> bool:
        return all((self.dir / f).is_file() for f in (MANIFEST, *CLIENT_FILES))

    def save_client_files(self, manifest: bytes, spec: bytes) -> None:
        _write(self.dir / CLIENT_FILES[0], spec)
        _write(self.dir / MANIFEST, manifest)

    def client_model(self) -> ClientModel:
        model = ClientModel.load(self.dir)
        if model.digest.hex() != self.digest:
            # The server answered, but with files that contradict each other: its fault, not ours.
            raise ServerAnsweredError(f"the server's client spec for this model does not match its digest "
                                      f"{self.digest[:16]}...; refusing to encrypt for it", 200)
        return model

    def keys(self, model: ClientModel) -> SecretKeys:
        """This client's keys for the model: loaded if cached, else generated and saved (0600)."""
        path = self.dir / "secret.keys"
        if path.is_file():
            return SecretKeys.load(path, model)
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
        _write(self.dir / "session.json", json.dumps({"session": session, "token": token}).encode(), mode=0o600)

    def forget_session(self) -> None:
        (self.dir / "session.json").unlink(missing_ok=True)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
