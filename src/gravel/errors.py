"""Gravel's exceptions, one tree so callers can catch at the level they care about.

    GravelError
    ├── DataError            a data set file is missing, truncated or not what it claims
    ├── ModelError           a model uses an operator or setting Gravel cannot compile
    ├── ArtifactError        an artifact directory is incomplete, altered or of another version
    ├── KeyMismatchError     keys or ciphertexts belong to another model, or are not keys at all
    ├── InputError           an input has the wrong shape, dtype or value range
    ├── DepthError           an encrypted (CKKS) computation needs more multiplicative depth
    │                        than its parameters, or any secure parameter set, allow
    └── ServiceError         a Gravel server answered with an error, or could not be reached

Every message names the file, layer or value at fault and, where there is one, what to do.
"""

from __future__ import annotations

__all__ = [
    "GravelError",
    "DataError",
    "ModelError",
    "ArtifactError",
    "KeyMismatchError",
    "InputError",
    "DepthError",
    "ServiceError",
]


class GravelError(Exception):
    """Base of every error Gravel raises on purpose."""


class DataError(GravelError):
    """A data set could not be read."""


class ModelError(GravelError):
    """A model cannot be trained, imported, quantized or compiled as asked."""


class ArtifactError(GravelError):
    """An artifact (or a file in it) is missing, corrupt or of an unsupported version."""


class KeyMismatchError(GravelError):
    """Keys or ciphertexts do not belong to this model, or are not what they claim to be."""


class InputError(GravelError):
    """An input array does not match what the model expects."""


class DepthError(GravelError):
    """A CKKS computation has run out of levels (no bootstrapping: depth is a budget), or no
    parameter set of the 128-bit security table gives the depth asked for."""


class ServiceError(GravelError):
    """A Gravel server refused a request (`status` is its HTTP status) or could not be reached
    (`status` is None); the message is the server's own explanation."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
