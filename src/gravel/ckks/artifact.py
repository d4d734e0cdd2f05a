"""A CKKS model as an artifact directory, with the TFHE artifact's conventions.

    NAME.gravel/
        manifest.json      format, backend {"name": "ckks", parameters, depth}, model info and the
                           compiler's report, input/output, the stage program (weights by name),
                           the packing plan with its rotation steps, file hashes
        client.ckks.json   the client's part: parameters, packing, rotation steps, output affine
                           (its SHA-256 is the model's digest, which frames keys and ciphertexts)
        weights.npz        stage matrices and biases (read with allow_pickle=False)

Written next to its destination and renamed into place: never half-written. No secrets, no
pickle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from gravel.ckks.client import CLIENT_FILE, CkksClient, read_client_spec
from gravel.ckks.compile import CkksCompiled
from gravel.ckks.program import CkksProgram
from gravel.ckks.server import CkksServer
from gravel.errors import ArtifactError
from gravel.protocol.manifest import FORMAT_VERSION, Manifest, file_sha256, load_manifest, publish_directory

__all__ = ["CLIENT_FILE", "compile_ckks_model", "load_client", "load_program", "load_server", "write_ckks_artifact"]


def write_ckks_artifact(out: str | Path, compiled: CkksCompiled, model_info: dict[str, Any],
                        overwrite: bool = False) -> Manifest:
    """The artifact directory of a planned program (see the module doc)."""
    program = compiled.program
    if program.params is None:
        raise ArtifactError("the CKKS program has no parameters: plan it before writing it")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        arrays: dict[str, np.ndarray] = {}
        prog_json = program.to_json(arrays)
        with open(tmp / "weights.npz", "wb") as f:
            np.savez(f, **arrays)
        client = program.client_json()
        # The client spec names the exact program (structure and weights): its hash, the
        # model's digest that frames keys and ciphertexts, then differs between any two models.
        client["program_sha256"] = _program_sha256(prog_json, arrays)
        (tmp / CLIENT_FILE).write_text(json.dumps(client, indent=1, sort_keys=True))
        files = {n: file_sha256(tmp / n) for n in (CLIENT_FILE, "weights.npz")}
        params = program.params
        manifest = {
            "format": "gravel-artifact",
            "format_version": FORMAT_VERSION,
            "gravel_version": version("gravel"),
            "backend": {"name": "ckks", "tenseal": version("tenseal"), "params": params.to_json(),
                        "depth": program.depth, "security_bits": params.security_bits},
            "model": dict(model_info, notes=list(compiled.notes), report=compiled.report),
            "input": {"shape": list(program.input_shape), "dtype": "float64"},
            "output": {"num_classes": program.n_out, "scale": program.out_scale,
                       "offset": program.out_offset},
            "program": prog_json,
            "packing": {
                "single": {"method": "diagonal (baby-step/giant-step)",
                           "rotation_steps": program.single_steps},
                "batch": {"method": "SIMD across samples", "block": program.block,
                          "complex": program.batch_complex,
                          "max_samples_per_group": program.block,
                          "rotation_steps": program.batch_steps},
            },
            "stats": {
                "depth": program.depth,
                "rotation_keys_single": len(program.single_steps),
                "rotation_keys_batch": len(program.batch_steps),
            },
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_manifest(out, role="all", backends=("ckks",))


def _program_sha256(prog_json: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(prog_json, sort_keys=True).encode())
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key], dtype=np.float64).tobytes())
    return h.hexdigest()


def _ckks_manifest(artifact: str | Path | Manifest, role: str) -> Manifest:
    manifest = artifact if isinstance(artifact, Manifest) else load_manifest(artifact, role=role, backends=("ckks",))
    if manifest.backend != "ckks":
        raise ArtifactError(f"{manifest.root}: a {manifest.backend} artifact, not a CKKS one; "
                            "compile with --backend ckks")
    return manifest


def load_program(artifact: str | Path | Manifest) -> CkksProgram:
    """The stage program (server side: reads the weights)."""
    manifest = _ckks_manifest(artifact, "server")
    try:
        with np.load(manifest.path("weights.npz"), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{manifest.root}: unreadable weights.npz ({exc})") from None
    spec = read_client_spec(manifest)
    if spec.get("program_sha256") != _program_sha256(manifest.data["program"], arrays):
        raise ArtifactError(f"{manifest.root}: the program and weights do not match the client spec's "
                            "program hash (altered?); recompile the model")
    return CkksProgram.from_artifact(manifest.data["program"], spec, arrays)


def load_server(artifact: str | Path | Manifest) -> CkksServer:
    """The compute party for an artifact."""
    manifest = _ckks_manifest(artifact, "server")
    return CkksServer(load_program(manifest), manifest.digest)


def load_client(artifact: str | Path | Manifest) -> CkksClient:
    """The data owner's side for an artifact (needs only the manifest and client spec)."""
    return CkksClient.load(_ckks_manifest(artifact, "client"))


def compile_ckks_model(model: Any, calib_x: np.ndarray, out: str | Path,
                       calib_y: np.ndarray | None = None, options: Any = None,
                       name: str | None = None, overwrite: bool = False,
                       finetune_data: tuple[np.ndarray, np.ndarray] | None = None) -> Manifest:
    """The whole CKKS compile: model (nn.Module, ONNX path, checkpoint, Graph) in, artifact out.
    `finetune_data`: labelled samples for `options.finetune_epochs` (default: the calibration set)."""
    from gravel.ckks.compile import CkksOptions, compile_ckks

    compiled, info = compile_ckks(model, calib_x, calib_y, options or CkksOptions(), name, finetune_data)
    return write_ckks_artifact(out, compiled, info, overwrite=overwrite)
