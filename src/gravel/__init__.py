"""Gravel: neural-network inference on encrypted data (TFHE), spread over many machines.

The roles live in their own packages: `gravel.compiler` (model owner), `gravel.client` (data
owner), `gravel.server` (evaluator); they meet only in `gravel.protocol`. The names below are
loaded on first use, so `import gravel.client` does not load the server or the compiler.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from gravel.errors import (
    ArtifactError,
    BlobFormatError,
    ClusterError,
    DataError,
    GravelError,
    InputError,
    KeyMismatchError,
    ModelError,
    ServerAnsweredError,
    ServerUnreachableError,
    ServiceError,
)

try:
    __version__ = version("gravel")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_LAZY = {
    "AsyncClient": "gravel.client",
    "Client": "gravel.client",
    "ClientModel": "gravel.client",
    "SecretKeys": "gravel.client",
    "ServerModel": "gravel.server",
    "QuantConfig": "gravel.compiler",
    "compile_model": "gravel.compiler",
    "load_dataset": "gravel.data",
}

__all__ = [
    "ArtifactError",
    "AsyncClient",
    "BlobFormatError",
    "Client",
    "ClientModel",
    "ClusterError",
    "DataError",
    "GravelError",
    "InputError",
    "KeyMismatchError",
    "ModelError",
    "QuantConfig",
    "SecretKeys",
    "ServerAnsweredError",
    "ServerModel",
    "ServerUnreachableError",
    "ServiceError",
    "__version__",
    "compile_model",
    "load_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gravel' has no attribute {name!r}")
