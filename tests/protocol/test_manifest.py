"""The artifact manifest: hashes, versions and roles checked, each refusal saying what to do.
Artifacts here are written by hand (no compiler, no crypto): the manifest checks files, it
does not parse them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gravel.errors import ArtifactError
from gravel.protocol import FORMAT_VERSION, file_sha256, load_manifest
from gravel.protocol.manifest import CLIENT_FILES, MANIFEST, SERVER_FILES, concrete_version

FILES = {"client.specs.json": b'{"spec": 1}', "server.zip": b"PK server program", "weights.npz": b"weights" * 50}


def _artifact(root: Path, **overrides) -> Path:
    """A minimal artifact directory whose manifest lists every file with its hash."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    data = {
        "format": "gravel-artifact",
        "format_version": FORMAT_VERSION,
        "model": {"name": "tiny"},
        "backend": {"concrete_python": concrete_version()},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()},
        "input": {"shape": [1, 8, 8], "bits": 2},
        "output": {"scale": [1.0], "offset": [0.0]},
        "stages": [{"name": "stage0"}],
        "plan": [{"name": "stage0", "shards": 1}],
    }
    data.update(overrides)
    (root / MANIFEST).write_text(json.dumps(data))
    return root


def test_the_roles_files_cover_the_artifact():
    assert set(CLIENT_FILES) | set(SERVER_FILES) == set(FILES) and not set(CLIENT_FILES) & set(SERVER_FILES)


@pytest.mark.parametrize("role", ["client", "server", "all"])
def test_loads_for_every_role(tmp_path, role):
    m = load_manifest(_artifact(tmp_path / "a.gravel"), role=role)
    assert m.name == "tiny" and m.root == tmp_path / "a.gravel"
    assert m.digest == hashlib.sha256(FILES["client.specs.json"]).digest()
    assert m.input["shape"] == [1, 8, 8] and m.stages[0]["name"] == "stage0" and m.plan[0]["shards"] == 1
    assert m.path("server.zip") == tmp_path / "a.gravel" / "server.zip"


def test_file_sha256_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 9000  # over 2 MiB: several 1 MiB reads
    (tmp_path / "big").write_bytes(data)
    assert file_sha256(tmp_path / "big") == hashlib.sha256(data).hexdigest()


def test_a_client_needs_only_its_files(tmp_path):
    root = _artifact(tmp_path / "a.gravel")
    for name in SERVER_FILES:
        (root / name).unlink()
    assert load_manifest(root, role="client").name == "tiny"
    with pytest.raises(ArtifactError, match="server.zip is missing"):
        load_manifest(root, role="server")


@pytest.mark.parametrize("name", sorted(FILES))
def test_an_altered_file_is_refused(tmp_path, name):
    root = _artifact(tmp_path / "a.gravel")
    (root / name).write_bytes(FILES[name] + b"!")
    with pytest.raises(ArtifactError, match=f"{name} does not match its hash in the manifest"):
        load_manifest(root, role="all")


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_missing_file_is_named(tmp_path, name):
    root = _artifact(tmp_path / "a.gravel")
    (root / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing"):
        load_manifest(root, role="all")


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path):
    root = _artifact(tmp_path / "a.gravel", files={"server.zip": "00" * 32})
    with pytest.raises(ArtifactError, match="manifest lists no client.specs.json"):
        load_manifest(root)


def test_no_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(ArtifactError, match="not a Gravel artifact .no manifest.json.; make one with `gravel compile`"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe\x00", b""])
def test_an_unreadable_manifest_is_named(tmp_path, text):
    (tmp_path / MANIFEST).write_bytes(text)
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("data", [[1, 2], "gravel-artifact", {"format": "onnx"}, {}])
def test_another_json_document_is_not_a_manifest(tmp_path, data):
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a Gravel manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, "1", None])
def test_another_format_version_says_recompile(tmp_path, version):
    root = _artifact(tmp_path / "a.gravel", format_version=version)
    with pytest.raises(ArtifactError, match=f"artifact format {version}, this Gravel reads {FORMAT_VERSION}; recompile"):
        load_manifest(root)


def test_another_backend_version_says_what_to_do(tmp_path):
    root = _artifact(tmp_path / "a.gravel", backend={"concrete_python": "0.0.1"})
    with pytest.raises(ArtifactError, match=f"compiled with concrete-python 0.0.1, installed is {concrete_version()}; "
                                            "recompile the model or install the matching version"):
        load_manifest(root)


def test_an_unknown_role_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown role 'owner'"):
        load_manifest(_artifact(tmp_path / "a.gravel"), role="owner")
