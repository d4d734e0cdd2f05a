"""Several framed ciphertexts in one body, for batch jobs and their results.

    magic "GRVB" | count (u32, big-endian) | count x (length u64 | framed blob)

Plain length-prefixed concatenation: each item keeps its own Gravel frame (kind and program
digest), so the receiver checks every item as it would a single one.
"""

from __future__ import annotations

import struct

from gravel.errors import BlobFormatError

__all__ = ["BATCH_MAGIC", "MAX_BATCH", "is_batch", "pack_batch", "unpack_batch"]

BATCH_MAGIC = b"GRVB"
MAX_BATCH = 4096


def is_batch(data: bytes) -> bool:
    return data[:4] == BATCH_MAGIC


def pack_batch(items: list[bytes]) -> bytes:
    if not items:
        raise ValueError("a batch needs at least one item")
    if len(items) > MAX_BATCH:
        raise ValueError(f"a batch holds at most {MAX_BATCH} items, got {len(items)}")
    parts = [BATCH_MAGIC, struct.pack(">I", len(items))]
    for item in items:
        parts += [struct.pack(">Q", len(item)), item]
    return b"".join(parts)


def unpack_batch(data: bytes, what: str = "batch") -> list[bytes]:
    """Split a batch; a truncated or inconsistent one names where it breaks."""
    if len(data) < 8 or not is_batch(data):
        raise BlobFormatError(f"{what}: not a Gravel batch (missing GRVB header)")
    (count,) = struct.unpack_from(">I", data, 4)
    if not 1 <= count <= MAX_BATCH:
        raise BlobFormatError(f"{what}: batch of {count} items; 1 to {MAX_BATCH} are allowed")
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
