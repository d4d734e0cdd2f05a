"""An artifact's files as they reach a Ray worker: bytes through the object store, written once
per node to a directory the loaders verify against the manifest's hashes."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from gravel.protocol.manifest import MANIFEST

__all__ = ["unpack_bundle"]


def unpack_bundle(bundle: dict[str, bytes]) -> Path:
    """A directory holding exactly `bundle`'s files: one per artifact, named by the hash of its
    manifest (which lists every other file's hash), written atomically once and shared by the
    workers of a node. Ray ends actors without running their clean-up, so the private copy per
    worker that this replaces was left behind in the temporary directory by every one of them.
    A copy that differs from the bundle (damaged, or half-deleted) is replaced."""
    name = f"gravel-artifact-{hashlib.sha256(bundle[MANIFEST]).hexdigest()[:32]}"
    root = Path(tempfile.gettempdir()) / name
    if _holds(root, bundle):
        return root
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    for file, data in bundle.items():
        (tmp / file).write_bytes(data)
    if root.exists():  # a damaged copy: move it aside first (another worker may do the same)
        stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=root.parent))
        try:
            root.rename(stale / name)
        except OSError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(root)  # atomic; another worker of this node may have been first
    except OSError:
        if not _holds(root, bundle):
            return tmp  # a private copy rather than a wrong one
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _holds(root: Path, bundle: dict[str, bytes]) -> bool:
    try:
        return all((root / f).stat().st_size == len(d) and (root / f).read_bytes() == d for f, d in bundle.items())
    except OSError:
        return False
