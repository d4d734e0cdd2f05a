"""SEAL objects to and from bytes, without touching the disk.

TenSEAL's `sealapi` binds SEAL's `save`/`load` to file paths only. An anonymous in-memory file
(`memfd_create`) reached through `/proc/self/fd` gives those methods a path while the bytes never
leave memory: nothing is written to disk, nothing is left behind, and SEAL's own (validating,
zstd-compressed) format is what travels. It is SEAL's serialization, not a new one.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["SEAL_ERRORS", "load_into", "to_bytes"]

# What SEAL's C++ exceptions become through pybind11 (invalid_argument, logic_error, ios failure,
# out_of_range, bad_alloc on absurd sizes).
SEAL_ERRORS = (ValueError, RuntimeError, TypeError, OSError, IndexError, MemoryError)


def to_bytes(obj: Any) -> bytes:
    """SEAL's serialized form of a sealapi object that has `save(path)` (ciphertexts, keys,
    Serializable* wrappers, which write the compact seeded form)."""
    fd = os.memfd_create("gravel-seal", os.MFD_CLOEXEC)
    try:
        obj.save(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while size > 0:
            chunk = os.read(fd, size)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_into(obj: Any, seal_context: Any, data: bytes) -> Any:
    """Fill `obj` (an empty sealapi Ciphertext or key object) from `data` with SEAL's
    validating `load`, which checks the object against `seal_context`; returns `obj`."""
    fd = os.memfd_create("gravel-seal", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        obj.load(seal_context, f"/proc/self/fd/{fd}")
        return obj
    finally:
        os.close(fd)
