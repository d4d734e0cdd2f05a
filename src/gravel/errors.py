"""Gravel's exceptions, one tree so callers can catch at the level they care about.

    GravelError
    ├── DataError                a data set file is missing, truncated or not what it claims
    ├── ModelError               a model uses an operator or setting Gravel cannot compile
    ├── ArtifactError            an artifact directory is incomplete, altered or of another version
    ├── KeyMismatchError         keys or ciphertexts belong to another model, or are of another kind
    │   └── BlobFormatError      the bytes are not a well-formed Gravel blob: truncated, garbled, empty
    ├── InputError               an input has the wrong shape, dtype or value range
    ├── DepthError               a CKKS computation needs more multiplicative depth than its
    │                            parameters, or any secure parameter set, allow
    ├── ClusterError             the Ray cluster cannot be reached, has no room, or lost the work
    ├── ServiceError             talking to a Gravel server failed (`status`: HTTP status or None)
    │   ├── ServerUnreachableError   no answer came: refused, unknown host, timed out, cut off
    │   └── ServerAnsweredError      the server answered with an error status (`status` is it)
    ├── ServerFault              a server could not do what a valid request asked: its own fault (5xx)
    │   └── StorageFullError     the server's disk (or quota) is full
    └── InferenceCancelled       an inference was stopped on request before it finished

Split by whose fault it is: a `BlobFormatError` means the bytes are damaged (send them again,
or from the right file); a bare `KeyMismatchError` means well-formed bytes for another model or
of another kind (use the keys of this model). A `ServerUnreachableError` is worth retrying
later; a `ServerAnsweredError` with a 4xx status is the caller's request to fix, a 5xx the
server's fault. Each subclass keeps its parent's meaning, so code that catches the parent
still works.

Every message names the file, layer or value at fault and, where there is one, what to do.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BlobFormatError",
    "ClusterError",
    "DataError",
    "DepthError",
    "GravelError",
    "InputError",
    "KeyMismatchError",
    "ModelError",
    "ServerAnsweredError",
    "ServerUnreachableError",
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


class BlobFormatError(KeyMismatchError):
    """Key or ciphertext bytes are malformed (truncated, garbled, of an unknown framing
    version): damage in transit or the wrong file, not a key of another model. A subclass of
    KeyMismatchError because both used to be reported as that."""


class InputError(GravelError):
    """An input array does not match what the model expects."""


class DepthError(GravelError):
    """A CKKS computation has run out of levels (no bootstrapping: depth is a budget), or no
    parameter set of the 128-bit security table gives the depth asked for."""


class ClusterError(GravelError):
    """The cluster cannot be reached, has no room, or an inference could not complete."""


class ServiceError(GravelError):
    """A Gravel server refused a request (`status` is its HTTP status) or could not be reached
    (`status` is None); the message is the server's own explanation."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnreachableError(ServiceError):
    """No answer came from the server (connection refused, unknown host, timeout, connection
    dropped): nothing is known about what it did; `status` is None."""

    def __init__(self, message: str) -> None:
        super().__init__(message, None)


class ServerAnsweredError(ServiceError):
    """The server answered with an error status (`status`: 4xx for the request's fault, 5xx
    for the server's) or with a body the SDK cannot read; the message carries its explanation."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, status)


class ServerFault(GravelError):
    """The server failed at a request that was valid: its own fault, never the client's, so the
    service answers 5xx (and logs the details under an error id) instead of 4xx."""


class StorageFullError(ServerFault):
    """The server's disk or quota is full: nothing new can be stored until space is freed;
    what is already stored is intact and stays readable."""


class InferenceCancelled(GravelError):
    """An inference was stopped on request (a cancelled job, a client that went away) at the
    next point where the engine checks: between items, stages or shards."""
