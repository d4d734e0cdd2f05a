"""A small header in front of every key or ciphertext blob that leaves a process.

The header says what the bytes are (evaluation keys, input or output ciphertext, secret keys)
and for which compiled program (the SHA-256 of its client spec), so a ciphertext or key from
another model, or a secret key sent where evaluation keys belong, is refused with a clear
message before the backend's deserializer ever sees it. It is framing, not cryptography.

    magic "GRVL" | version (1 byte) | kind (1 byte) | program digest (32 bytes) | payload
"""

from __future__ import annotations

from enum import IntEnum

from gravel.errors import BlobFormatError, KeyMismatchError

__all__ = ["HEADER_SIZE", "Kind", "check_header", "frame", "unframe"]

_MAGIC = b"GRVL"
_VERSION = 1
HEADER_SIZE = 4 + 1 + 1 + 32


class Kind(IntEnum):
    EVALUATION_KEYS = 1
    INPUT_CIPHERTEXT = 2
    OUTPUT_CIPHERTEXT = 3
    SECRET_KEYS = 4
    # CKKS (gravel.ckks / gravel.tensor): the digest of a context blob is the SHA-256 of its own
    # payload; that of a ciphertext blob is the SHA-256 of its public context's payload.
    CKKS_PUBLIC_CONTEXT = 5
    CKKS_CIPHERTEXT = 6

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


def frame(kind: Kind, digest: bytes, payload: bytes) -> bytes:
    if len(digest) != 32:
        raise ValueError("program digest must be 32 bytes (SHA-256)")
    return _MAGIC + bytes([_VERSION, int(kind)]) + digest + payload


def check_header(head: bytes, kind: Kind, digest: bytes, what: str = "input") -> None:
    """Check a blob's header from its first HEADER_SIZE bytes alone, e.g. while a body is
    still streaming in, so a wrong blob is refused before the rest of it is read."""
    unframe(bytes(head[:HEADER_SIZE]) + b"\0", kind, digest, what)


def unframe(data: bytes, kind: Kind, digest: bytes, what: str = "input") -> bytes:
    """Check the header and return the payload; every mismatch names what was found.

    Damaged bytes (no header, unknown version or kind, no payload) raise BlobFormatError;
    well-formed bytes of another kind or for another model raise KeyMismatchError.
    """
    if len(data) < HEADER_SIZE or data[:4] != _MAGIC:
        raise BlobFormatError(f"{what}: not a Gravel {kind.label} blob (missing header; truncated or wrong file?)")
    if data[4] != _VERSION:
        raise BlobFormatError(f"{what}: framing version {data[4]}, this Gravel reads version {_VERSION}")
    try:
        found = Kind(data[5])
    except ValueError:
        raise BlobFormatError(f"{what}: unknown blob kind {data[5]}") from None
    if found != kind:
        hint = (
            ": a SECRET key set must never be sent; send the evaluation keys (SecretKeys.evaluation_keys())"
            if found == Kind.SECRET_KEYS
            else ""
        )
        raise KeyMismatchError(f"{what}: expected {kind.label}, got {found.label}{hint}")
    if data[6:HEADER_SIZE] != digest:
        raise KeyMismatchError(
            f"{what}: {found.label} made for another model (program {data[6:14].hex()}..., "
            f"this artifact is {digest[:8].hex()}...)"
        )
    payload = data[HEADER_SIZE:]
    if not payload:
        raise BlobFormatError(f"{what}: {found.label} has an empty body (truncated?)")
    return payload
