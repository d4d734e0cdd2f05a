"""/v1/models: list, describe, the client's files (anyone); deploy and delete (admin).

An artifact arrives as an uncompressed tar archive of its directory. Only the artifact files of
its backend are taken (TFHE: manifest.json, client.specs.json, server.zip, weights.npz; CKKS:
manifest.json, client.ckks.json, weights.npz), as regular files with bounded sizes, each into a
blob; the manifest is checked against its backend's schema, then its hashes and versions, the
server program is loaded once and the sizes of the program's keys and inputs are measured (TFHE:
exact; CKKS: a bound on the keys, see gravel.service.ckks_runner), all before the model is
registered: a refused deploy leaves nothing behind. A TFHE server program is read by concrete's
loader (which uses jsonpickle inside server.zip), so only the admin, i.e. the model owner, can
deploy: clients never send programs. A CKKS program is JSON and an .npz read without pickle.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from gravel.errors import GravelError
from gravel.protocol.manifest import (
    BACKEND_FILES,
    MANIFEST,
    file_sha256,
    load_manifest,
)
from gravel.service.api_errors import ERRORS, ApiError, scrub
from gravel.service.bodies import check_type, receive_body
from gravel.service.container import service_of
from gravel.service.dependencies import require_admin
from gravel.service.manifest_schema import MAX_MANIFEST_BYTES, parse_manifest
from gravel.service.measure import measure_sizes
from gravel.service.store import Store, storage_errors

__all__ = ["admin_router", "router"]

log = logging.getLogger("gravel.service")

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)
admin_router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS,
                         dependencies=[Depends(require_admin)])

# every file name an artifact of some backend holds; each backend's own set is BACKEND_FILES
ARTIFACT_FILES = tuple(dict.fromkeys([MANIFEST, *(f for c, sv in BACKEND_FILES.values() for f in (*c, *sv))]))
TAR_TYPES = ("application/x-tar", "application/octet-stream")
MAX_MEMBERS = 16  # the four files, their directory, a few pax headers
MAX_HEADER_DATA = 64 << 10  # pax / GNU long-name data, read into memory by tarfile
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class ModelInfo(BaseModel):
    name: str
    digest: str
    created: float
    input_shape: list[int]
    input_bits: int | None = None  # TFHE: the input's quantization; CKKS inputs are real numbers
    classes: int
    stages: list[dict[str, Any]]
    pbs_count: int | None = None  # TFHE: table lookups per inference
    backend: str  # "concrete VERSION" (TFHE) or "ckks VERSION" (TenSEAL's)
    keys_bytes: int | None = None  # TFHE: the exact size of the keys; CKKS: the most they may take
    input_bytes: int | None = None  # TFHE: the exact size of one input; CKKS: none (it varies)
    depth: int | None = None  # CKKS: the multiplicative depth the keys' parameters allow
    packings: list[str] | None = None  # CKKS: "single" (one image) and "batch" (SIMD across images)


class ModelList(BaseModel):
    models: list[ModelInfo]


def model_info(row: dict[str, Any]) -> ModelInfo:
    m = row["manifest"]
    if m["backend"]["name"] == "ckks":
        return ModelInfo(
            name=row["name"], digest=row["digest"], created=row["created"],
            input_shape=list(m["input"]["shape"]), classes=int(m["output"]["num_classes"]),
            stages=[{"name": f"stage {i}" + (f" ({st['source']})" if st.get("source") else ""), "shards": 1}
                    for i, st in enumerate(m["program"]["stages"])],
            backend=f"ckks {m['backend']['tenseal']}", keys_bytes=row.get("keys_bytes"),
            depth=int(m["backend"]["depth"]), packings=["single", "batch"],
        )
    return ModelInfo(
        name=row["name"],
        digest=row["digest"],
        created=row["created"],
        input_shape=list(m["input"]["shape"]),
        input_bits=int(m["input"]["bits"]),
        classes=int(m["output"]["num_classes"]),
        stages=[{"name": s["name"], "shards": s["shards"]} for s in m["plan"]],
        pbs_count=m["stats"]["pbs_count"],
        backend=f"{m['backend']['name']} {m['backend']['concrete_python']}",
        keys_bytes=row.get("keys_bytes"),
        input_bytes=row.get("input_bytes"),
    )


@router.get("", response_model=ModelList, summary="List deployed models")
def list_models(request: Request) -> ModelList:
    models = []
    for row in service_of(request).store.list_models():
        try:  # rows are checked at deploy; one from an older server must not hide the others
            models.append(model_info(row))
        except (KeyError, TypeError, ValueError) as exc:
            log.error("model %r has an unreadable manifest and is not listed: %r", row["name"], exc)
    return ModelList(models=models)


@admin_router.post(
    "",
    response_model=ModelInfo,
    status_code=201,
    summary="Deploy a compiled artifact (admin)",
    description="Body: an uncompressed tar archive of an artifact directory (`gravel deploy` makes "
    "it). 201 when registered, 200 when the same artifact is already there, 409 when another "
    "artifact has that name. The server measures the program's key and input sizes (one "
    "throwaway key generation), so a deploy takes seconds.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}} for media in TAR_TYPES
            },
        }
    },
)
async def deploy(request: Request, response: Response) -> ModelInfo:
    svc = service_of(request)
    check_type(request, *TAR_TYPES)
    upload = await receive_body(request, svc.store, svc.config.max_artifact_bytes, "artifact archive",
                                svc.config.body_timeout_s)
    try:
        row, created = await run_in_threadpool(_ingest, svc.store, upload.path, svc.config.max_artifact_bytes)
    finally:
        upload.discard()
    if created:
        svc.engine.drop_model(row["name"])
    else:
        response.status_code = 200
    return model_info(row)


@router.get("/{name}", response_model=ModelInfo, summary="Describe a model")
def describe(name: str, request: Request) -> ModelInfo:
    return model_info(service_of(request).model_row(name))


@router.get(
    "/{name}/manifest",
    summary="The model's manifest.json, as deployed (client side)",
    responses={200: {"content": {"application/json": {}}}},
)
def manifest(name: str, request: Request) -> Response:
    return _client_file(request, name, MANIFEST)


@router.get(
    "/{name}/client-spec",
    summary="The model's client spec: client.specs.json (TFHE) or client.ckks.json (CKKS)",
    responses={200: {"content": {"application/json": {}}}},
)
def client_spec(name: str, request: Request) -> Response:
    row = service_of(request).model_row(name)
    return _client_file(request, name, BACKEND_FILES[row["manifest"]["backend"]["name"]][0][0])


@admin_router.delete("/{name}", status_code=204, summary="Delete a model with its sessions and jobs (admin)")
def delete(name: str, request: Request) -> Response:
    svc = service_of(request)
    svc.model_row(name)
    for sid in svc.store.delete_model(name):
        svc.runner.cancel_session(sid)
        svc.engine.drop_session(sid)
    svc.engine.drop_model(name)
    return Response(status_code=204)


def _client_file(request: Request, name: str, fname: str) -> Response:
    svc = service_of(request)
    row = svc.model_row(name)
    return Response(svc.store.read_blob(row["files"][fname]), media_type="application/json")


def _ingest(store: Store, archive: Path, limit: int) -> tuple[dict[str, Any], bool]:
    """Check an uploaded archive and register its model; returns (row, newly created)."""
    work = Path(tempfile.mkdtemp(dir=store.tmp_dir, prefix="artifact-"))

    def refuse(exc: BaseException, prefix: str = "artifact rejected") -> ApiError:
        # Messages name files inside the artifact, never where the server unpacked it.
        return ApiError(400, f"{prefix}: {scrub(str(exc), {str(work): 'artifact', str(store.root): 'DATA_DIR'})}")

    try:
        with storage_errors("the uploaded artifact"):
            seen = _extract(archive, work, limit)
        try:
            data = parse_manifest((work / MANIFEST).read_bytes())
        except GravelError as exc:
            raise refuse(exc) from None
        backend = data["backend"]["name"]
        wanted = (MANIFEST, *BACKEND_FILES[backend][0], *BACKEND_FILES[backend][1])
        other = sorted(seen - set(wanted))
        if other:
            raise ApiError(400, f"artifact archive: {', '.join(other)} in a {backend} artifact, which holds "
                                f"{', '.join(wanted)} only")
        missing = [f for f in wanted if f not in seen]
        if missing:
            raise ApiError(400, f"artifact archive: missing {', '.join(missing)}")
        try:
            manifest = load_manifest(work, role="all", backends=tuple(BACKEND_FILES))
        except GravelError as exc:
            raise refuse(exc) from None
        name = data["model"]["name"]
        try:
            keys_bytes, input_bytes = _load_and_measure(manifest)
        except GravelError as exc:
            raise refuse(exc) from None
        except Exception as exc:  # noqa: BLE001 - the backend's loader on a damaged program
            raise refuse(exc, "artifact rejected: its server program does not load") from None
        # load_manifest has checked the other files against the hashes the manifest lists.
        files = {f: data["files"][f] for f in wanted if f != MANIFEST}
        files[MANIFEST] = file_sha256(work / MANIFEST)
        with store.lock:
            existing = store.get_model(name)
            if existing is not None:
                if existing["files"] == files:
                    return existing, False
                raise ApiError(409, f"a different model named {name!r} is deployed; delete it first")
            for f in wanted:
                store.put_file(work / f)
            store.add_model(name, manifest.digest.hex(), files[MANIFEST], files, data, keys_bytes, input_bytes)
            return store.get_model(name), True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_and_measure(manifest) -> tuple[int | None, int | None]:
    """Load the server program once (refusing one that does not load) and measure the sizes the
    routes hold keys and inputs to: (keys bytes, input bytes)."""
    if manifest.backend == "ckks":
        from gravel.service.ckks_runner import CkksServerModel, ckks_key_limit

        CkksServerModel(manifest.root)
        return ckks_key_limit(manifest), None
    from gravel.server import ServerModel

    ServerModel(manifest)
    sizes = measure_sizes(manifest)
    return sizes.keys_bytes, sizes.input_bytes


def _extract(archive: Path, into: Path, limit: int) -> set[str]:
    """Take the artifact's files out of an uncompressed tar, refusing anything else by name,
    and bounding what is written: no compression and no sparse members, so nothing expands
    beyond the archive's own size (itself under the artifact limit); every file is copied to
    exactly its declared size."""
    _check_headers(archive)
    try:
        tar = tarfile.open(archive, "r:")
    except (tarfile.TarError, OSError):
        raise ApiError(400, "artifact archive: not an uncompressed tar archive") from None
    seen: set[str] = set()
    written = 0
    with tar:
        try:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise ApiError(400, f"artifact archive: more than {MAX_MEMBERS} entries")
                path = PurePosixPath(member.name)
                if member.isdir():
                    continue
                if ".." in path.parts or path.is_absolute() or len(path.parts) > 2:
                    raise ApiError(400, f"artifact archive: unexpected path {member.name!r}")
                if member.issparse():
                    raise ApiError(400, f"artifact archive: {member.name!r} is a sparse file; "
                                        "send regular files (gravel deploy does)")
                if not member.isreg():
                    raise ApiError(400, f"artifact archive: {member.name!r} is not a regular file")
                if path.name not in ARTIFACT_FILES:
                    raise ApiError(400, f"artifact archive: unexpected file {member.name!r}; an artifact "
                                        f"holds {MANIFEST} and its backend's files ({', '.join(ARTIFACT_FILES[1:])})")
                if path.name in seen:
                    raise ApiError(400, f"artifact archive: {path.name} appears twice")
                cap = MAX_MANIFEST_BYTES if path.name == MANIFEST else limit
                if member.size > cap or written + member.size > limit:
                    raise ApiError(413, f"artifact archive: {path.name} declares {member.size} bytes, over "
                                        f"the limit of {min(cap, limit - written)}")
                seen.add(path.name)
                src = tar.extractfile(member)
                with open(into / path.name, "wb") as dst:
                    copied = _copy(src, dst, member.size)
                if copied != member.size:
                    raise ApiError(400, f"artifact archive: {path.name} is truncated")
                written += copied
        except (tarfile.TarError, EOFError):
            raise ApiError(400, "artifact archive: truncated or corrupt") from None
    if MANIFEST not in seen:
        raise ApiError(400, f"artifact archive: missing {MANIFEST}")
    return seen


def _check_headers(archive: Path) -> None:
    """Before tarfile reads the archive: refuse compressed ones by their magic bytes, and
    walk the 512-byte headers (with tarfile's own header parser) to refuse pax or GNU
    long-name records whose data tarfile would read whole into memory."""
    with open(archive, "rb") as f:
        magic = f.read(6)
        for prefix, kind in COMPRESSED.items():
            if magic.startswith(prefix):
                raise ApiError(400, f"artifact archive: {kind}-compressed; send an uncompressed tar "
                                    "(the artifact's files are compressed already; gravel deploy sends one)")
        size = archive.stat().st_size
        pos = 0
        for _ in range(4 * MAX_MEMBERS):
            f.seek(pos)
            block = f.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE or block.count(0) == tarfile.BLOCKSIZE:
                return
            try:
                info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError:
                raise ApiError(400, "artifact archive: not an uncompressed tar archive") from None
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                             tarfile.GNUTYPE_LONGLINK) and info.size > MAX_HEADER_DATA:
                raise ApiError(400, f"artifact archive: a {info.size}-byte extended header; "
                                    f"at most {MAX_HEADER_DATA} are read")
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise ApiError(400, f"artifact archive: {info.name!r} is a sparse file; send regular files")
            pos += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if pos > size:
                raise ApiError(400, "artifact archive: truncated")
        raise ApiError(400, f"artifact archive: more than {MAX_MEMBERS} entries")


def _copy(src: BinaryIO | None, dst: BinaryIO, size: int) -> int:
    """Copy at most `size` bytes; returns how many were copied."""
    copied = 0
    while src is not None and copied < size:
        chunk = src.read(min(1 << 20, size - copied))
        if not chunk:
            break
        dst.write(chunk)
        copied += len(chunk)
    return copied
