"""The client side of a CKKS model, with the calls of the TFHE `ClientModel`, so the SDK, the
cache and the CLI treat both backends alike (`load_client_model` picks the class).

Keys are a `gravel.ckks.SecretContext` (secret, relinearisation and Galois keys for the
rotations of both packings by default); only `evaluation_keys()` (the public context, framed
with the model's digest) is ever sent. One image is encrypted in the "single" packing; a batch
of images as ONE input in the "batch" packing (SIMD across images), which the server runs as
one item and answers with one output that decrypts to every image's scores.

Needs the artifact's manifest and client spec only; imports nothing of the server side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gravel.ckks.client import CkksClient
from gravel.ckks.context import SecretContext
from gravel.client.atomic import write_atomic
from gravel.errors import InputError, KeyMismatchError
from gravel.protocol import Kind, Manifest, frame, is_batch, load_manifest, unframe, unpack_batch
from gravel.protocol.quantization import conform

__all__ = ["CkksClientModel", "CkksSecretKeys"]

MODES = ("single", "batch")


class CkksSecretKeys:
    """A client's CKKS key set for one model; holds the SECRET key."""

    def __init__(self, context: SecretContext, client: CkksClient) -> None:
        self.context = context
        self.digest = client.digest
        self._client = client

    @property
    def modes(self) -> tuple[str, ...]:
        """The packings these keys serve ("single", "batch")."""
        return self._client.modes

    def evaluation_keys(self) -> bytes:
        """The public context (no secret key in it), framed for the server."""
        return self._client.evaluation_keys()

    def save(self, path: str | Path) -> None:
        """Write the SECRET key set to `path` (mode 0600, atomically). Anyone holding it can decrypt."""
        write_atomic(path, frame(Kind.SECRET_KEYS, self.digest, self.context.serialize_secret()), mode=0o600, sync=True)

    @staticmethod
    def load(path: str | Path, model: CkksClientModel) -> CkksSecretKeys:
        path = Path(path)
        if not path.is_file():
            raise KeyMismatchError(f"{path}: no such key file")
        payload = unframe(path.read_bytes(), Kind.SECRET_KEYS, model.digest, str(path))
        return model.use_keys(SecretContext.load_secret(payload))


class CkksClientModel:
    """Encrypt and decrypt for one CKKS artifact (see the module doc)."""

    backend = "ckks"

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.digest = manifest.digest
        self._spec_client = CkksClient.load(manifest)
        self.input_shape = self._spec_client.input_shape
        self.num_classes = self._spec_client.n_out

    @staticmethod
    def load(artifact: str | Path) -> CkksClientModel:
        return CkksClientModel(load_manifest(artifact, role="client", backends=("ckks",)))

    def _fresh_client(self) -> CkksClient:
        return CkksClient.load(self.manifest)

    def keygen(self, seed: int | None = None, modes: tuple[str, ...] = MODES) -> CkksSecretKeys:
        """New keys for `modes` (both packings by default). SEAL draws its own randomness:
        `seed` is refused rather than silently ignored."""
        if seed is not None:
            raise InputError("CKKS keys cannot be generated from a seed (SEAL draws its own randomness)")
        client = self._fresh_client()
        client.keygen(tuple(modes))
        context = client.context
        if context is None:
            raise KeyMismatchError("CKKS key generation made no keys")
        return CkksSecretKeys(context, client)

    def use_keys(self, context: SecretContext) -> CkksSecretKeys:
        client = self._fresh_client()
        client.use_keys(context)
        return CkksSecretKeys(context, client)

    def _check(self, keys: Any) -> CkksClient:
        if not isinstance(keys, CkksSecretKeys) or keys.digest != self.digest:
            raise KeyMismatchError("these keys were generated for another model")
        return keys._client

    def encrypt(self, keys: CkksSecretKeys, image: Any) -> bytes:
        """One image (packing "single"), as an input blob for this model."""
        return self._check(keys).encrypt(conform(image, self.input_shape)[None], mode="single")

    def encrypt_batch(self, keys: CkksSecretKeys, images: Sequence[Any]) -> bytes:
        """Several images as ONE input (packing "batch", SIMD across images)."""
        if len(images) == 0:
            raise InputError("no images given: a batch needs at least one")
        x = np.stack([conform(image, self.input_shape) for image in images])
        return self._check(keys).encrypt(x, mode="batch")

    def decrypt(self, keys: CkksSecretKeys, ciphertext: bytes) -> np.ndarray:
        """Class scores: (classes,) for an output of one image, (n, classes) for a batch."""
        scores = self._check(keys).decrypt(ciphertext)
        return scores[0] if len(scores) == 1 else scores

    def decrypt_all(self, keys: CkksSecretKeys, data: bytes) -> list[np.ndarray]:
        """Every image's scores in a server answer: one output (of one image or a batch), or a
        packed batch of outputs."""
        items = unpack_batch(data, "result batch") if is_batch(data) else [data]
        client = self._check(keys)
        return [row for item in items for row in client.decrypt(item)]

    def predict(self, keys: CkksSecretKeys, ciphertext: bytes) -> int:
        return int(np.argmax(self.decrypt(keys, ciphertext)))
