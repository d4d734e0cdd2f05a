"""Ciphertexts as framed bytes: what crosses between parties (never a pickle).

    frame(Kind.CKKS_CIPHERTEXT, digest, payload)       digest = SHA-256 of the public context
    payload = u32 n | JSON header (n bytes) | extra bytes | SEAL ciphertext 0 | ciphertext 1 ...

The JSON header carries the caller's own fields (a tensor's shape and layout kind, a model's
input name) plus the byte sizes of `extra` and of each ciphertext. Loading refuses, by name, a
blob made under another context (its digest), a blob of another kind, truncation, sizes that do
not add up, and any ciphertext SEAL's validating loader or Gravel's level/scale check refuses.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gravel.ckks.ciphertext import Ciphertext
from gravel.errors import BlobFormatError, InputError, KeyMismatchError
from gravel.protocol.framing import HEADER_SIZE, Kind, frame, unframe

if TYPE_CHECKING:
    from gravel.ckks.context import _KeyedContext

__all__ = ["blob_parts", "dump_ciphertexts", "join_parts", "load_ciphertexts"]

_FORMAT = 1
_U32 = struct.Struct("<I")
_MAX_CIPHERTEXTS = 1 << 16
_RESERVED = ("format", "ciphertexts", "extra")


def dump_ciphertexts(context: _KeyedContext, cts: Sequence[Ciphertext], header: dict[str, Any],
                     extra: bytes = b"") -> bytes:
    """Frame `cts` (seeded where fresh) with a JSON `header` and `extra` bytes."""
    return join_parts(context.digest, [ct.to_bytes() for ct in cts], header, extra)


def join_parts(digest: bytes, blobs: Sequence[bytes], header: dict[str, Any], extra: bytes = b"") -> bytes:
    """The blob of serialized ciphertexts `blobs` under the public context `digest` (what
    `dump_ciphertexts` writes; also how a batch's parts are put back together unread)."""
    if any(k in header for k in _RESERVED):
        raise InputError(f"header keys {_RESERVED} are the blob's own")
    head = dict(header, format=_FORMAT, ciphertexts=[len(b) for b in blobs], extra=len(extra))
    head_bytes = json.dumps(head, sort_keys=True).encode()
    payload = b"".join([_U32.pack(len(head_bytes)), head_bytes, extra, *blobs])
    return frame(Kind.CKKS_CIPHERTEXT, digest, payload)


def blob_parts(data: bytes, what: str = "ciphertext blob") -> tuple[bytes, dict[str, Any], bytes, list[bytes]]:
    """(public context digest, header, extra, serialized ciphertexts) of a blob, checked for
    framing and sizes only: no key is needed and no ciphertext is parsed (a driver splitting a
    batch among workers, each of which loads its part with `load_ciphertexts`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_SIZE or data[:4] != b"GRVL" or data[5] != Kind.CKKS_CIPHERTEXT:
        raise BlobFormatError(f"{what}: not a CKKS ciphertext blob")
    digest = data[6:HEADER_SIZE]
    payload = unframe(data, Kind.CKKS_CIPHERTEXT, digest, what=what)
    head, extra, blobs = _parse(payload, what)
    return digest, head, extra, blobs


def _parse(payload: bytes, what: str) -> tuple[dict[str, Any], bytes, list[bytes]]:
    if len(payload) < _U32.size:
        raise BlobFormatError(f"{what}: truncated header")
    (n,) = _U32.unpack_from(payload)
    if n > 1 << 16 or _U32.size + n > len(payload):
        raise BlobFormatError(f"{what}: header length out of range (truncated?)")
    try:
        head = json.loads(payload[_U32.size:_U32.size + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BlobFormatError(f"{what}: header is not JSON") from None
    if not isinstance(head, dict) or head.get("format") != _FORMAT:
        raise KeyMismatchError(f"{what}: unknown header format (another Gravel version?)")
    sizes, extra_len = head.get("ciphertexts"), head.get("extra")
    if not (isinstance(sizes, list) and 1 <= len(sizes) <= _MAX_CIPHERTEXTS
            and all(isinstance(s, int) and s > 0 for s in sizes)
            and isinstance(extra_len, int) and extra_len >= 0):
        raise BlobFormatError(f"{what}: malformed header (ciphertext sizes)")
    pos = _U32.size + n
    if pos + extra_len + sum(sizes) != len(payload):
        raise BlobFormatError(
            f"{what}: {len(payload) - pos} bytes after the header, the header says "
            f"{extra_len + sum(sizes)} (truncated or altered)"
        )
    extra = payload[pos:pos + extra_len]
    pos += extra_len
    blobs = []
    for size in sizes:
        blobs.append(payload[pos:pos + size])
        pos += size
    for key in _RESERVED:
        head.pop(key)
    return head, extra, blobs


def load_ciphertexts(context: _KeyedContext, data: bytes, what: str = "ciphertext blob"
                     ) -> tuple[list[Ciphertext], dict[str, Any], bytes]:
    """The ciphertexts (all at one level), the header and the extra bytes of `dump_ciphertexts`
    output, checked against `context`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if (len(data) >= HEADER_SIZE and data[:4] == b"GRVL" and data[5] == Kind.CKKS_CIPHERTEXT
            and data[6:HEADER_SIZE] != context.digest):
        raise KeyMismatchError(
            f"{what} made under another CKKS context (public context {data[6:14].hex()}..., "
            f"this one is {context.digest[:8].hex()}...): load it with the context it was "
            "encrypted under"
        )
    payload = unframe(data, Kind.CKKS_CIPHERTEXT, context.digest, what=what)
    head, extra, blobs = _parse(payload, what)
    cts = [Ciphertext.from_bytes(context, b, what=f"{what}, ciphertext {i}") for i, b in enumerate(blobs)]
    if len({ct.level for ct in cts}) > 1:
        raise KeyMismatchError(f"{what}: its ciphertexts are at different levels")
    return cts, head, extra
