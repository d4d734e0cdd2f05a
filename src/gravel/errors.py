"""Gravel's exceptions, one tree so callers can catch at the level they care about.

    GravelError
    ├── DataError            a data set file is missing, truncated or not what it claims
    ├── ModelError           a model uses an operator or setting Gravel cannot compile
    ├── ArtifactError        an artifact directory is incomplete, altered or of another version
    ├── KeyMismatchError     keys or ciphertexts belong to another model, or are not keys at all
    ├── InputError           an input has the wrong shape, dtype or value range
    ├── ServiceError         a Gravel server answered with an error, or could not be reached
    ├── ServerFault          a server could not do what a valid request asked: its own fault (5xx)
    │   └── StorageFullError the server's disk (or quota) is full
    └── InferenceCancelled   an inference was stopped on request before it finished

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
    "ServiceError",
    "ServerFault",
    "StorageFullError",
    "InferenceCancelled",
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


class ServiceError(GravelError):
    """A Gravel server refused a request (`status` is its HTTP status) or could not be reached
    (`status` is None); the message is the server's own explanation."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerFault(GravelError):
    """The server failed at a request that was valid: its own fault, never the client's, so the
    service answers 5xx (and logs the details under an error id) instead of 4xx."""


class StorageFullError(ServerFault):
    """The server's disk or quota is full: nothing new can be stored until space is freed;
    what is already stored is intact and stays readable."""


class InferenceCancelled(GravelError):
    """An inference was stopped on request (a cancelled job, a client that went away) at the
    next point where the engine checks: between items, stages or shards."""
