"""/v1/models: deploy (admin), list, describe, the client's files, delete (admin).

An artifact arrives as a tar archive of its directory. Only the four artifact files are taken,
as regular files, each into a blob; the manifest's hashes and versions are checked and the
server program is loaded once before the model is registered. The server program is read by
the backend's loader (which uses jsonpickle inside server.zip), so only the admin, i.e. the
model owner, can deploy: clients never send programs.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from gravel.errors import GravelError
from gravel.protocol.manifest import CLIENT_FILES, MANIFEST, SERVER_FILES, file_sha256, load_manifest
from gravel.service.state import ERRORS, ApiError, check_type, read_body, service_of
from gravel.service.store import Store

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)

ARTIFACT_FILES = (MANIFEST, *CLIENT_FILES, *SERVER_FILES)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TAR_TYPES = ("application/x-tar", "application/octet-stream")


class ModelInfo(BaseModel):
    name: str
    digest: str
    created: float
    input_shape: list[int]
    input_bits: int
    classes: int
    stages: list[dict[str, Any]]
    pbs_count: int
    backend: str


class ModelList(BaseModel):
    models: list[ModelInfo]


def model_info(row: dict[str, Any]) -> ModelInfo:
    m = row["manifest"]
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
    )


@router.get("", response_model=ModelList, summary="List deployed models")
def list_models(request: Request) -> ModelList:
    return ModelList(models=[model_info(r) for r in service_of(request).store.list_models()])


@router.post(
    "",
    response_model=ModelInfo,
    status_code=201,
    summary="Deploy a compiled artifact (admin)",
    description="Body: a tar archive of an artifact directory (`gravel deploy` makes it). "
    "201 when registered, 200 when the same artifact is already there, 409 when another "
    "artifact has that name.",
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
    svc.require_admin(request)
    check_type(request, *TAR_TYPES)
    upload = await read_body(request, svc.store, svc.config.max_artifact_bytes, "artifact archive")
    try:
        row, created = await run_in_threadpool(_ingest, svc.store, upload.path)
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
    summary="The model's client.specs.json (the backend's client spec)",
    responses={200: {"content": {"application/json": {}}}},
)
def client_spec(name: str, request: Request) -> Response:
    return _client_file(request, name, CLIENT_FILES[0])


@router.delete("/{name}", status_code=204, summary="Delete a model with its sessions and jobs (admin)")
def delete(name: str, request: Request) -> Response:
    svc = service_of(request)
    svc.require_admin(request)
    svc.model_row(name)
    for sid in svc.store.delete_model(name):
        svc.engine.drop_session(sid)
    svc.engine.drop_model(name)
    return Response(status_code=204)


def _client_file(request: Request, name: str, fname: str) -> Response:
    svc = service_of(request)
    row = svc.model_row(name)
    return Response(svc.store.read_blob(row["files"][fname]), media_type="application/json")


def _ingest(store: Store, archive: Path) -> tuple[dict[str, Any], bool]:
    """Check an uploaded archive and register its model; returns (row, newly created)."""
    work = Path(tempfile.mkdtemp(dir=store.tmp_dir, prefix="artifact-"))
    try:
        _extract(archive, work)
        try:
            manifest = load_manifest(work, role="all")
        except GravelError as exc:
            raise ApiError(400, f"artifact rejected: {exc}") from None
        name = manifest.name
        if not NAME.match(name):
            raise ApiError(400, f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        try:
            from gravel.server import ServerModel

            ServerModel(manifest)
        except GravelError as exc:
            raise ApiError(400, f"artifact rejected: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the backend's loader on a damaged program
            raise ApiError(400, f"artifact rejected: its server program does not load ({exc})") from None
        # load_manifest has checked the other files against the hashes the manifest lists.
        files = {f: manifest.data["files"][f] for f in (*CLIENT_FILES, *SERVER_FILES)}
        files[MANIFEST] = file_sha256(work / MANIFEST)
        with store.lock:
            existing = store.get_model(name)
            if existing is not None:
                if existing["files"] == files:
                    return existing, False
                raise ApiError(409, f"a different model named {name!r} is deployed; delete it first")
            for f in ARTIFACT_FILES:
                store.put_file(work / f)
            store.add_model(name, manifest.digest.hex(), files[MANIFEST], files, manifest.data)
            return store.get_model(name), True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(archive: Path, into: Path) -> None:
    """Take the artifact's files out of a tar, refusing anything else by name."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ApiError(400, f"artifact archive: not a tar archive ({exc})") from None
    seen: set[str] = set()
    with tar:
        try:
            for member in tar:
                path = PurePosixPath(member.name)
                if member.isdir():
                    continue
                if ".." in path.parts or path.is_absolute() or len(path.parts) > 2:
                    raise ApiError(400, f"artifact archive: unexpected path {member.name!r}")
                if not member.isreg():
                    raise ApiError(400, f"artifact archive: {member.name!r} is not a regular file")
                if path.name not in ARTIFACT_FILES:
                    raise ApiError(400, f"artifact archive: unexpected file {member.name!r}; an artifact "
                                        f"holds {', '.join(ARTIFACT_FILES)}")
                if path.name in seen:
                    raise ApiError(400, f"artifact archive: {path.name} appears twice")
                seen.add(path.name)
                src = tar.extractfile(member)
                with open(into / path.name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ApiError(400, f"artifact archive: truncated or corrupt ({exc})") from None
    missing = [f for f in ARTIFACT_FILES if f not in seen]
    if missing:
        raise ApiError(400, f"artifact archive: missing {', '.join(missing)}")
