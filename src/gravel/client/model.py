"""Client-side view of a compiled model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gravel.client.atomic import write_atomic
from gravel.errors import BlobFormatError, KeyMismatchError
from gravel.protocol import Kind, Manifest, frame, load_manifest, unframe, unpack_parts
from gravel.protocol.quantization import InputQuantizer

__all__ = ["ClientModel", "SecretKeys", "load_client_model", "load_secret_keys"]


class SecretKeys:
    """A client's key set (secret and evaluation keys) for one compiled program."""

    def __init__(self, keys, digest: bytes) -> None:
        self._keys = keys
        self.digest = digest

    def evaluation_keys(self) -> bytes:
        """The public evaluation keys, framed for the server; they reveal nothing of the secret."""
        return frame(Kind.EVALUATION_KEYS, self.digest, self._keys.evaluation.serialize())

    def save(self, path: str | Path) -> None:
        """Write the SECRET key to `path` (mode 0600, atomically). Anyone holding it can decrypt."""
        write_atomic(path, frame(Kind.SECRET_KEYS, self.digest, self._keys.serialize()), mode=0o600, sync=True)

    @staticmethod
    def load(path: str | Path, model: ClientModel) -> SecretKeys:
        from concrete import fhe

        path = Path(path)
        if not path.is_file():
            raise KeyMismatchError(f"{path}: no such key file")
        payload = unframe(path.read_bytes(), Kind.SECRET_KEYS, model.digest, str(path))
        try:
            keys = fhe.Keys.deserialize(payload)
        except Exception as exc:  # noqa: BLE001 - the backend raises RuntimeError and others
            raise BlobFormatError(f"{path}: secret keys are corrupt ({exc})") from exc
        return SecretKeys(keys, model.digest)


class ClientModel:
    """Quantize, encrypt, decrypt and dequantize for one artifact."""

    backend = "concrete"

    def __init__(self, manifest: Manifest) -> None:
        from concrete import fhe

        self.manifest = manifest
        self.digest = manifest.digest
        specs = fhe.ClientSpecs.deserialize(manifest.path("client.specs.json").read_bytes())
        self._client = fhe.Client(specs)
        self.quantizer = InputQuantizer.from_json(manifest.input)
        self.input_shape = self.quantizer.shape
        self.first = manifest.input_function
        self.out_scale = np.asarray(manifest.output["scale"])
        self.out_offset = np.asarray(manifest.output["offset"])

    @staticmethod
    def load(artifact: str | Path) -> ClientModel:
        return ClientModel(load_manifest(artifact, role="client"))

    def keygen(self, seed: int | None = None) -> SecretKeys:
        from concrete import fhe

        keys = fhe.Keys(self._client.specs)
        keys.generate(secret_seed=seed) if seed is not None else keys.generate()
        return SecretKeys(keys, self.digest)

    def quantize(self, image: np.ndarray) -> np.ndarray:
        """Validate one input (floats, or uint8 grey levels) and quantize it as the model
        expects; the rule is the manifest's (gravel.protocol.quantization)."""
        return self.quantizer.quantize(image)

    def encrypt(self, keys: SecretKeys, image: np.ndarray) -> bytes:
        self._check(keys)
        self._client.keys = keys._keys
        values = self._client.encrypt(self.quantize(image), function_name=self.first)
        value = values[0] if isinstance(values, tuple) else values
        return frame(Kind.INPUT_CIPHERTEXT, self.digest, value.serialize())

    def decrypt(self, keys: SecretKeys, ciphertext: bytes) -> np.ndarray:
        """Decrypt an output ciphertext to dequantized class scores (logits). An output in
        several parts (a last stage split into partial outputs) is the sum of its parts."""
        from concrete import fhe

        self._check(keys)
        payload = unframe(ciphertext, Kind.OUTPUT_CIPHERTEXT, self.digest, "output ciphertext")
        parts = unpack_parts(payload)
        functions = self.manifest.output_functions(len(parts))
        try:
            self._client.keys = keys._keys
            acc = sum(np.asarray(self._client.decrypt(fhe.Value.deserialize(part), function_name=name), dtype=np.int64)
                      for part, name in zip(parts, functions))
        except Exception as exc:  # noqa: BLE001 - backend errors become one clear message
            raise BlobFormatError(f"output ciphertext cannot be decrypted: corrupt or truncated ({exc})") from exc
        return np.asarray(acc).reshape(-1) * self.out_scale + self.out_offset

    def predict(self, keys: SecretKeys, ciphertext: bytes) -> int:
        return int(np.argmax(self.decrypt(keys, ciphertext)))

    def _check(self, keys: SecretKeys) -> None:
        if keys.digest != self.digest:
            raise KeyMismatchError("these keys were generated for another model")


def load_client_model(artifact: str | Path) -> Any:
    """The client side of an artifact, whichever its backend: `ClientModel` (TFHE) or
    `gravel.client.ckks_model.CkksClientModel` (CKKS), which take the same calls."""
    manifest = load_manifest(artifact, role="client", backends=("concrete", "ckks"))
    if manifest.backend == "ckks":
        from gravel.client.ckks_model import CkksClientModel

        return CkksClientModel(manifest)
    return ClientModel(manifest)


def load_secret_keys(path: str | Path, model: Any) -> Any:
    """A saved secret key set for `model` (from `load_client_model`)."""
    if getattr(model, "backend", "concrete") == "ckks":
        from gravel.client.ckks_model import CkksSecretKeys

        return CkksSecretKeys.load(path, model)
    return SecretKeys.load(path, model)
