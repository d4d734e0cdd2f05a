"""The manifest an uploaded artifact must carry, checked field by field before anything is
loaded or committed.

The service reads these fields itself (to describe the model, to plan shards, to hand clients
their quantization), so a missing or mistyped one must be refused at deploy with a 400 that
names it, not found later as a 500 on every `GET /v1/models`. Fields the service does not read
may be anything. The JSON text itself is bounded in size and nesting before it is parsed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from gravel.errors import ArtifactError

__all__ = ["BACKENDS", "MAX_MANIFEST_BYTES", "parse_manifest"]

MAX_MANIFEST_BYTES = 1 << 20
MAX_DEPTH = 32
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

Check = Callable[[Any, str], None]


def _fail(path: str, problem: str, value: Any) -> NoReturn:
    shown = json.dumps(value)[:60] if _is_json_scalar(value) else type(value).__name__
    raise ArtifactError(f"manifest.json: {path} {problem} (found {shown})")


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def integer(lo: int, hi: int) -> Check:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            _fail(path, f"must be an integer from {lo} to {hi}", value)

    return check


def number() -> Check:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(path, "must be a finite number", value)

    return check


def string(pattern: re.Pattern[str] | None = None, hint: str = "", max_len: int = 256) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str) or not value or len(value) > max_len:
            _fail(path, f"must be a non-empty string of at most {max_len} characters", value)
        if pattern is not None and not pattern.match(value):
            _fail(path, f"must be {hint}", value)

    return check


def const(expected: Any) -> Check:
    def check(value: Any, path: str) -> None:
        if value != expected:
            _fail(path, f"must be {json.dumps(expected)}", value)

    return check


def array(item: Check | dict, lo: int, hi: int) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            _fail(path, f"must be a list of {lo} to {hi} items", value)
        for i, v in enumerate(value):
            _check(item, v, f"{path}[{i}]")

    return check


@dataclass(frozen=True)
class Maybe:
    """A field that may be absent."""

    name: str


SCHEMA: dict = {
    "format": const("gravel-artifact"),
    "format_version": integer(0, 1 << 16),  # load_manifest names the version it reads
    "backend": {"name": string(), "concrete_python": string()},
    "model": {"name": string(NAME, "letters, digits, '.', '_' or '-', starting with a letter or digit, "
                                   "at most 64", max_len=64)},
    "files": {name: string(HEX64, "a SHA-256 in lowercase hex") for name in
              ("client.specs.json", "server.zip", "weights.npz")},
    "input": {"shape": array(integer(1, 1 << 16), 1, 8), "bits": integer(1, 16)},
    "output": {"num_classes": integer(1, 1 << 16), "scale": array(number(), 1, 1 << 16),
               "offset": array(number(), 1, 1 << 16)},
    "stages": array({"name": string()}, 1, 1024),
    "plan": array({"name": string(), "shards": integer(1, 4096), "shard_size": integer(0, 1 << 24),
                   "in_parts": integer(1, 4096)}, 1, 1024),
    "stats": {"pbs_count": integer(0, 1 << 50)},
    Maybe("fused"): {"function": string()},
}

STEP = integer(-(1 << 17), 1 << 17)
# A CKKS artifact (gravel.ckks.artifact): what the service reads to describe the model and to
# check a client's keys without loading the weights; the program itself is checked by loading
# it (its hash is in the client spec) before the model is registered.
CKKS_SCHEMA: dict = {
    "format": const("gravel-artifact"),
    "format_version": integer(0, 1 << 16),
    "backend": {"name": const("ckks"), "tenseal": string(), "depth": integer(0, 64),
                "params": {"poly_modulus_degree": integer(1024, 1 << 17),
                           "coeff_mod_bit_sizes": array(integer(1, 61), 2, 64),
                           "scale_bits": integer(1, 60)}},
    "model": SCHEMA["model"],
    "files": {name: string(HEX64, "a SHA-256 in lowercase hex") for name in ("client.ckks.json", "weights.npz")},
    "input": {"shape": array(integer(1, 1 << 16), 1, 8)},
    "output": {"num_classes": integer(1, 1 << 16), "scale": number(), "offset": number()},
    "program": {"stages": array({}, 1, 1024)},
    "packing": {"single": {"rotation_steps": array(STEP, 0, 1 << 14)},
                "batch": {"block": integer(1, 1 << 17), "rotation_steps": array(STEP, 0, 1 << 14)}},
}
BACKENDS = {"concrete": SCHEMA, "ckks": CKKS_SCHEMA}


def _check(spec: Check | dict, value: Any, path: str) -> None:
    if callable(spec):
        spec(value, path)
        return
    if not isinstance(value, dict):
        _fail(path or "the document", "must be an object", value)
    for key, sub in spec.items():
        name = key.name if isinstance(key, Maybe) else key
        where = f"{path}.{name}" if path else name
        if name not in value:
            if isinstance(key, Maybe):
                continue
            raise ArtifactError(f"manifest.json: {where} is missing")
        _check(sub, value[name], where)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth, stopping as soon as it passes `limit`."""
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_manifest(text: bytes) -> dict[str, Any]:
    """The manifest's JSON, checked against SCHEMA; ArtifactError names the first bad field."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"manifest.json: {len(text)} bytes; a manifest has at most {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ArtifactError(f"manifest.json: nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"manifest.json: not JSON ({exc})") from None
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise ArtifactError(f"manifest.json: nested deeper than {MAX_DEPTH} levels")
    backend = data.get("backend") if isinstance(data, dict) else None
    # the backend's name picks the schema; without a readable one, the TFHE schema names the fault
    name = backend.get("name", "concrete") if isinstance(backend, dict) else "concrete"
    if name not in BACKENDS:
        _fail("backend.name", f"must be one of {', '.join(map(json.dumps, BACKENDS))}", name)
    _check(BACKENDS[name], data, "")
    if name == "ckks":
        return data
    classes = data["output"]["num_classes"]
    for field in ("scale", "offset"):
        if len(data["output"][field]) != classes:
            raise ArtifactError(f"manifest.json: output.{field} has {len(data['output'][field])} values "
                                f"for {classes} classes")
    names = [s["name"] for s in data["stages"]]
    if len(set(names)) != len(names):
        raise ArtifactError("manifest.json: stages have duplicate names")
    return data
