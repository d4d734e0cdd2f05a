"""Artifact files shipped to Ray workers: one directory per artifact and node, not one per worker."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from gravel.cluster.bundle import unpack_bundle
from gravel.errors import ArtifactError
from gravel.protocol.manifest import CLIENT_FILES, MANIFEST, SERVER_FILES
from gravel.server import ServerModel


def _bundle(artifact: Path) -> dict[str, bytes]:
    return {name: (artifact / name).read_bytes() for name in SERVER_FILES + CLIENT_FILES + (MANIFEST,)}


def test_workers_of_a_node_share_one_verified_copy(digits_artifact):
    bundle = _bundle(digits_artifact)
    first, second = unpack_bundle(bundle), unpack_bundle(bundle)
    assert first == second and first.parent == Path(tempfile.gettempdir())
    assert {p.name for p in first.iterdir()} == set(bundle)
    assert not list(first.parent.glob(f".{first.name}-*"))  # no half-written copy left behind
    ServerModel.load(first)  # the hashes in the manifest hold


def test_a_damaged_copy_is_replaced(digits_artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = unpack_bundle(_bundle(digits_artifact))
    (root / "weights.npz").write_bytes(b"not the weights")
    with pytest.raises(ArtifactError, match="does not match its hash"):
        ServerModel.load(root)
    assert unpack_bundle(_bundle(digits_artifact)) == root
    ServerModel.load(root)
    # nothing stale or half-written left (concrete's loader unpacks its own tmp* directories)
    assert [p.name for p in tmp_path.iterdir() if "gravel-artifact" in p.name] == [root.name]
