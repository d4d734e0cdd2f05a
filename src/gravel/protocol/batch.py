"""Several framed ciphertexts in one body, for batch jobs and their results; and the parts
of one output ciphertext.

    magic "GRVB" | count (u32, big-endian) | count x (length u64 | framed blob)

Plain length-prefixed concatenation: each item keeps its own Gravel frame (kind and program
digest), so the receiver checks every item as it would a single one.

An output ciphertext's payload (inside its one frame) is the backend's serialized value, or,
where the program's last stage returns partial outputs that the client adds (see
`Manifest.output_functions`), the parts in the same layout under the magic "GRVP". A backend
value never starts with it (concrete's values begin with a small segment count).
"""

from __future__ import annotations

import struct

from gravel.errors import BlobFormatError

__all__ = ["BATCH_MAGIC", "MAX_BATCH", "PARTS_MAGIC", "is_batch", "pack_batch", "pack_parts", "unpack_batch",
           "unpack_parts"]

BATCH_MAGIC = b"GRVB"
PARTS_MAGIC = b"GRVP"
MAX_BATCH = 4096
MAX_PARTS = 1024


def is_batch(data: bytes) -> bool:
    return data[:4] == BATCH_MAGIC


def _pack(magic: bytes, items: list[bytes], most: int, noun: str) -> bytes:
    if not items:
        raise ValueError(f"a {noun} needs at least one item")
    if len(items) > most:
        raise ValueError(f"a {noun} holds at most {most} items, got {len(items)}")
    parts = [magic, struct.pack(">I", len(items))]
    for item in items:
        parts += [struct.pack(">Q", len(item)), item]
    return b"".join(parts)


def pack_batch(items: list[bytes]) -> bytes:
    return _pack(BATCH_MAGIC, items, MAX_BATCH, "batch")


def pack_parts(parts: list[bytes]) -> bytes:
    """An output payload: the one backend value as it is, or several partial outputs (and a
    single value that happens to start with the container's magic wrapped too, so that
    `unpack_parts` never misreads it)."""
    if len(parts) == 1 and parts[0][:4] != PARTS_MAGIC:
        return parts[0]
    return _pack(PARTS_MAGIC, parts, MAX_PARTS, "partial output")


def unpack_parts(payload: bytes, what: str = "output ciphertext") -> list[bytes]:
    """The parts of an output payload (one, where it is a plain backend value)."""
    return _unpack(payload, MAX_PARTS, what, "parts") if payload[:4] == PARTS_MAGIC else [payload]


def unpack_batch(data: bytes, what: str = "batch") -> list[bytes]:
    """Split a batch; a truncated or inconsistent one names where it breaks."""
    if len(data) < 8 or not is_batch(data):
        raise BlobFormatError(f"{what}: not a Gravel batch (missing GRVB header)")
    return _unpack(data, MAX_BATCH, what, "batch")


def _unpack(data: bytes, most: int, what: str, noun: str) -> list[bytes]:
    if len(data) < 8:
        raise BlobFormatError(f"{what}: truncated {noun} header")
    (count,) = struct.unpack_from(">I", data, 4)
    if not 1 <= count <= most:
        raise BlobFormatError(f"{what}: {noun} of {count} items; 1 to {most} are allowed")
    items, pos = [], 8
    for i in range(count):
        if pos + 8 > len(data):
            raise BlobFormatError(f"{what}: truncated before item {i} of {count}")
        (size,) = struct.unpack_from(">Q", data, pos)
        pos += 8
        if size == 0 or pos + size > len(data):
            raise BlobFormatError(f"{what}: item {i} of {count} is truncated or empty")
        items.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        raise BlobFormatError(f"{what}: {len(data) - pos} stray bytes after {count} items")
    return items
