"""Issue 10, items 5, 6 and 8, against the shared real server: hostile deploy archives and
malformed manifests get a 400 (or 413) naming the problem, with no server path in it; nothing
is registered, and every other client still lists the models."""

from __future__ import annotations

import bz2
import copy
import gzip
import io
import json
import lzma
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest

from gravel.protocol.manifest import CLIENT_FILES, MANIFEST, SERVER_FILES

from .conftest import ADMIN

FILES = (MANIFEST, *CLIENT_FILES, *SERVER_FILES)


def _tar(files: dict[str, bytes], fmt=tarfile.GNU_FORMAT, pax: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"m.gravel/{name}")
            info.size = len(data)
            if pax and name == MANIFEST:
                info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(service_artifact) -> dict[str, bytes]:
    return {name: (Path(service_artifact) / name).read_bytes() for name in FILES}


@pytest.fixture(scope="module")
def manifest(files) -> dict:
    return json.loads(files[MANIFEST])


def _deploy(server, body: bytes):
    return httpx.post(server.url + "/v1/models", content=body, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-tar"})


def _refused(server, deployed, body: bytes, status: int, *words: str) -> str:
    r = _deploy(server, body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, detail
    assert str(server.data_dir) not in detail and "/tmp" not in detail, detail
    listed = httpx.get(server.url + "/v1/models")
    assert listed.status_code == 200 and [m["name"] for m in listed.json()["models"]] == [deployed]
    assert not list((server.data_dir / "tmp").iterdir())
    return detail


def test_compressed_sparse_and_oversized_archives_are_refused(server, deployed, files, tmp_path):
    plain = _tar(files)
    for compress, kind in ((gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")):
        _refused(server, deployed, compress(plain), 400, f"{kind}-compressed", "uncompressed tar")
    # A sparse member: 1 GiB of holes that would expand on extraction (GNU tar, both formats).
    (tmp_path / "m.gravel").mkdir()
    for name, data in files.items():
        (tmp_path / "m.gravel" / name).write_bytes(data)
    with open(tmp_path / "m.gravel" / "weights.npz", "r+b") as f:
        f.truncate(1 << 30)
    for fmt in ("gnu", "posix"):
        archive = tmp_path / f"sparse-{fmt}.tar"
        subprocess.run(["tar", "-S", f"--format={fmt}", "-cf", str(archive), "-C", str(tmp_path), "m.gravel"],
                       check=True)
        assert archive.stat().st_size < 1 << 20
        _refused(server, deployed, archive.read_bytes(), 400, "sparse")
    # A pax header whose data tarfile would read whole into memory.
    _refused(server, deployed, _tar(files, tarfile.PAX_FORMAT, {"comment": "x" * (1 << 20)}), 400,
             "extended header")
    # A manifest over its own size bound, and archives that are not tars at all.
    big = dict(files, **{MANIFEST: files[MANIFEST] + b" " * (2 << 20)})
    _refused(server, deployed, _tar(big), 413, "manifest.json declares")
    _refused(server, deployed, b"\0" * 1024 + b"junk", 400, "artifact archive")
    _refused(server, deployed, plain[: len(plain) // 2], 400, "artifact archive")


def _with(manifest: dict, change) -> dict:
    m = copy.deepcopy(manifest)
    change(m)
    return m


def test_malformed_manifests_are_refused_naming_the_field(server, deployed, files, manifest):
    deep = "[" * 5000 + "]" * 5000
    cases = [
        (b'{"model": ' + deep.encode() + b"}", "nested deeper"),
        (b"not json", "not JSON"),
        (b"[1, 2]", "must be an object"),
        (_with(manifest, lambda m: m.pop("model")), "model is missing"),
        (_with(manifest, lambda m: m["model"].update(name=7)), "model.name must be a non-empty string"),
        (_with(manifest, lambda m: m["model"].update(name="../x")), "model.name must be letters"),
        (_with(manifest, lambda m: m["input"].update(bits="x")), "input.bits must be an integer"),
        (_with(manifest, lambda m: m["input"].update(bits=True)), "input.bits must be an integer"),
        (_with(manifest, lambda m: m.pop("stats")), "stats is missing"),
        (_with(manifest, lambda m: m["plan"][0].update(shards=0)), "plan[0].shards must be an integer"),
        (_with(manifest, lambda m: m["output"].update(scale=[1.0])), "output.scale has 1 values"),
        (_with(manifest, lambda m: m["files"].update({"server.zip": "00"})), "files.server.zip must be a SHA-256"),
        (_with(manifest, lambda m: m.update(fused={"function": 3})), "fused.function"),
    ]
    for text, words in cases:
        body = text if isinstance(text, bytes) else json.dumps(text).encode()
        _refused(server, deployed, _tar(dict(files, **{MANIFEST: body})), 400, "manifest.json", words)


def test_refusals_after_the_schema_name_files_not_server_paths(server, deployed, files, manifest):
    # A file altered after compilation: the hash check, whose message used to carry the path.
    altered = dict(files, **{"weights.npz": files["weights.npz"] + b"\0"})
    detail = _refused(server, deployed, _tar(altered), 400, "weights.npz does not match its hash")
    assert detail.startswith("artifact rejected: artifact: ")
    # Another backend version.
    old = _with(manifest, lambda m: m["backend"].update(concrete_python="0.0.1"))
    _refused(server, deployed, _tar(dict(files, **{MANIFEST: json.dumps(old).encode()})), 400,
             "compiled with concrete-python 0.0.1")
    # A server program that is not a program, with a matching hash.
    import hashlib

    junk = b"PK\x03\x04 not really a zip"
    fake = _with(manifest, lambda m: m["files"].update({"server.zip": hashlib.sha256(junk).hexdigest()}))
    _refused(server, deployed, _tar(dict(files, **{MANIFEST: json.dumps(fake).encode(), "server.zip": junk})),
             400, "server program does not load")
