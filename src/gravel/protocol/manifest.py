"""The artifact's manifest: what each party needs to know, with hashes of every file.

An artifact directory holds manifest.json, client.specs.json (the client's part),
server.zip and weights.npz (the server's part). Loading for one role checks only that role's
files, so a client never needs the server program, and refuses versions it cannot read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gravel.errors import ArtifactError, BlobFormatError

__all__ = [
    "BACKEND_FILES",
    "CLIENT_FILES",
    "FORMAT_VERSION",
    "INPUT",
    "SERVER_FILES",
    "Manifest",
    "artifact_backend",
    "file_sha256",
    "load_manifest",
    "publish_directory",
    "shard_function",
    "shard_slice",
    "stage_arguments",
]

# 2: the program is a graph of stages (plan rows name the stages they read), input quantization
# over a calibrated range
# 3: no stage function takes clear weight arguments (each shard has its constants compiled in)
FORMAT_VERSION = 3
# what plan rows call the client's input ciphertext
INPUT = "input"
MANIFEST = "manifest.json"
CLIENT_FILES = ("client.specs.json",)
SERVER_FILES = ("server.zip", "weights.npz")
# each backend's (client files, server files); the first client file's hash is the program digest
BACKEND_FILES = {
    "concrete": (CLIENT_FILES, SERVER_FILES),
    "ckks": (("client.ckks.json",), ("weights.npz",)),
}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def concrete_version() -> str:
    from importlib.metadata import version

    return version("concrete-python")


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.data["model"]["name"]

    @property
    def backend(self) -> str:
        """"concrete" (TFHE) or "ckks"."""
        return self.data.get("backend", {}).get("name", "concrete")

    @property
    def client_files(self) -> tuple[str, ...]:
        return BACKEND_FILES[self.backend][0]

    @property
    def server_files(self) -> tuple[str, ...]:
        return BACKEND_FILES[self.backend][1]

    @property
    def digest(self) -> bytes:
        """SHA-256 of the client spec: the identity of this compiled program."""
        return bytes.fromhex(self.data["files"][self.client_files[0]])

    @property
    def input(self) -> dict[str, Any]:
        return self.data["input"]

    @property
    def output(self) -> dict[str, Any]:
        return self.data["output"]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    @property
    def plan(self) -> list[dict[str, Any]]:
        return self.data["plan"]

    @property
    def input_function(self) -> str:
        """The function the client encrypts its input for."""
        return self.data["io"]["input_function"]

    @property
    def output_function(self) -> str | None:
        """The function whose output the client decrypts, where the server returns one value
        (None where the program has no such function: its outputs always come in parts)."""
        return self.data["io"].get("output_function")

    def output_functions(self, parts: int) -> list[str]:
        """The function each part of an output ciphertext comes from. One part: the output
        function's. Several: a program whose last stage is split returns its shards' partial
        outputs (`io.output_parts`), which the client decrypts each as its own and adds.
        The one rule the client's decryption and the compiler's `io` share."""
        split = self.data["io"].get("output_parts") or []
        if split and parts == len(split):
            return list(split)
        if parts == 1 and self.output_function:
            return [self.output_function]
        expected = " or ".join(str(n) for n in ([1] if self.output_function else []) + ([len(split)] if split else []))
        raise BlobFormatError(f"output ciphertext has {parts} parts; this model's outputs have {expected}")

    def path(self, name: str) -> Path:
        return self.root / name


def artifact_backend(root: str | Path) -> str:
    """The backend an artifact directory names ("concrete" or "ckks"), from its manifest alone
    (no hash is checked: for choosing a loader, which checks them)."""
    try:
        data = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{root}: not a readable Gravel artifact ({exc})") from None
    backend = data.get("backend") if isinstance(data, dict) else None
    return str(backend.get("name", "concrete")) if isinstance(backend, dict) else "concrete"


def publish_directory(tmp: Path, out: Path) -> None:
    """Move a complete artifact directory `tmp` to `out`, replacing an existing one only now
    that the new one is whole (used by both backends' writers)."""
    import shutil

    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def shard_slice(channels: int, shards: int, index: int) -> slice:
    """The output channels of shard `index` of `shards`: equal contiguous slices, in order (the
    next stage reads the shards' outputs concatenated)."""
    size = channels // shards
    return slice(index * size, (index + 1) * size)


def shard_function(row: dict[str, Any], shard: int) -> str:
    """The backend function that evaluates shard `shard` of a stage: the shard's own (`functions`,
    a sharded stage), else the stage's. The one rule the compiler's wiring and the server share."""
    functions = row.get("functions") or ()
    return functions[shard] if functions else row["name"]


def stage_arguments(row: dict[str, Any], outputs: dict[str, list[Any]]) -> list[Any]:
    """A stage's encrypted arguments: every shard output of each stage it reads, in order.
    The one rule the compiler's wiring, the server and the cluster executor share."""
    try:
        return [part for name in row["inputs"] for part in outputs[name]]
    except KeyError as exc:
        raise ArtifactError(f"stage {row.get('name')!r} reads {exc.args[0]!r}, which has not run before it") from None


def load_manifest(root: str | Path, role: str = "client", backends: tuple[str, ...] = ("concrete",)) -> Manifest:
    """Read and verify an artifact for `role` ("client", "server" or "all"), refusing a
    backend not in `backends` (the TFHE runner, service and SDK read concrete artifacts; the
    CKKS ones are read by gravel.ckks.artifact)."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root}: not a Gravel artifact (no {MANIFEST}); make one with `gravel compile`")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mpath}: unreadable manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != "gravel-artifact":
        raise ArtifactError(f"{mpath}: not a Gravel manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{root}: artifact format {data.get('format_version')}, this Gravel reads {FORMAT_VERSION}; recompile it"
        )
    backend = data.get("backend", {}).get("name", "concrete") if isinstance(data.get("backend"), dict) else None
    if backend not in BACKEND_FILES:
        raise ArtifactError(f"{root}: unknown backend {backend!r}; this Gravel reads {', '.join(BACKEND_FILES)}")
    if backend not in backends:
        raise ArtifactError(
            f"{root}: a {backend} artifact; this part of Gravel reads {', '.join(backends)} artifacts"
            + (" (read CKKS artifacts with gravel.ckks.artifact, or gravel.client.model.load_client_model "
               "on the client side)" if backend == "ckks" else "")
        )
    if backend == "concrete":
        built = data.get("backend", {}).get("concrete_python")
        if built != concrete_version():
            raise ArtifactError(
                f"{root}: compiled with concrete-python {built}, installed is {concrete_version()}; "
                "recompile the model or install the matching version"
            )
    client_files, server_files = BACKEND_FILES[backend]
    wanted = {"client": client_files, "server": server_files + client_files, "all": server_files + client_files}
    if role not in wanted:
        raise ValueError(f"unknown role {role!r}")
    files = data.get("files", {})
    for name in wanted[role]:
        path = root / name
        if name not in files:
            raise ArtifactError(f"{root}: manifest lists no {name}")
        if not path.is_file():
            raise ArtifactError(f"{root}: {name} is missing")
        if file_sha256(path) != files[name]:
            raise ArtifactError(f"{root}: {name} does not match its hash in the manifest (altered or corrupt)")
    return Manifest(root, data)
