"""The contract between client and server: the artifact manifest and the framing of key and
ciphertext bytes. Client and server import this package, never each other."""

from gravel.protocol.batch import is_batch, pack_batch, pack_parts, unpack_batch, unpack_parts
from gravel.protocol.framing import Kind, frame, unframe
from gravel.protocol.manifest import FORMAT_VERSION, Manifest, file_sha256, load_manifest

__all__ = [
    "FORMAT_VERSION",
    "Kind",
    "Manifest",
    "file_sha256",
    "frame",
    "is_batch",
    "load_manifest",
    "pack_batch",
    "pack_parts",
    "unframe",
    "unpack_batch",
    "unpack_parts",
]
