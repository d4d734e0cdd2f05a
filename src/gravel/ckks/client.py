"""The data owner of a CKKS model: keys, encryption, decryption. The secret key stays here.

A client is made from the artifact's client spec (`client.ckks.json`: parameters, packing and
rotation steps; no weights) and the model's digest. It generates a SecretContext with the
relinearisation key and Galois keys for exactly the rotation steps of the packings it will use,
sends `evaluation_keys()` (SEAL's seeded, compressed public keys, framed with the model's
digest), encrypts one image (mode "single": contiguous slots) or a batch (mode "batch": SIMD,
feature j of every image in one block of slots) and decrypts the server's answer to logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gravel.ckks.blob import dump_ciphertexts, load_ciphertexts
from gravel.ckks.context import SecretContext
from gravel.ckks.evaluator import Evaluator
from gravel.ckks.packing import samples_layout
from gravel.ckks.params import CkksParams
from gravel.errors import ArtifactError, InputError, KeyMismatchError
from gravel.protocol.framing import Kind, frame, unframe
from gravel.protocol.manifest import Manifest, load_manifest

__all__ = ["CLIENT_FILE", "CkksClient", "read_client_spec"]

CLIENT_FILE = "client.ckks.json"


def read_client_spec(manifest: Manifest) -> dict[str, Any]:
    """The artifact's client spec (JSON, no weights), checked to be one."""
    try:
        spec = json.loads(manifest.path(CLIENT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest.root}: unreadable {CLIENT_FILE} ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != "gravel-ckks-client":
        raise ArtifactError(f"{manifest.root}: {CLIENT_FILE} is not a CKKS client spec")
    return spec


class CkksClient:
    """Keys and encryption for one compiled CKKS model (see the module doc)."""

    def __init__(self, spec: dict[str, Any], digest: bytes) -> None:
        try:
            self.params = CkksParams.from_json(spec["params"])
            self.input_shape = tuple(int(d) for d in spec["input_shape"])
            self.n_in, self.n_out = int(spec["n_in"]), int(spec["n_out"])
            self.out_scale = float(spec["output"]["scale"])
            self.out_offset = float(spec["output"]["offset"])
            self.single_steps = [int(s) for s in spec["single"]["rotation_steps"]]
            self.output_slots = np.asarray(spec["single"]["output_slots"], dtype=np.int64)
            self.single_kind = str(spec["single"]["layout"])
            self.single_period = int(spec["single"]["period"])
            self.single_shift = int(spec["single"]["shift"])
            self.block = int(spec["batch"]["block"])
            self.batch_complex = bool(spec["batch"].get("complex", False))
            self.batch_steps = [int(s) for s in spec["batch"]["rotation_steps"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"CKKS client spec: malformed ({exc}); recompile the model") from None
        if self.single_kind not in ("replicated", "contiguous") or (
                self.single_kind == "replicated" and not self.n_in <= self.single_period <= self.params.slots):
            raise ArtifactError(f"CKKS client spec: unknown single-image layout {self.single_kind!r}; "
                                "recompile the model or update Gravel")
        if len(self.output_slots) != self.n_out or math.prod(self.input_shape) != self.n_in:
            raise ArtifactError("CKKS client spec: sizes do not add up; recompile the model")
        self.digest = digest
        self.context: SecretContext | None = None
        self._ev: Evaluator | None = None

    @classmethod
    def load(cls, artifact: str | Path | Manifest) -> CkksClient:
        """The client of an artifact: reads (and checks the hashes of) its manifest and client
        spec only; no server file is needed or read."""
        manifest = artifact if isinstance(artifact, Manifest) else load_manifest(
            artifact, role="client", backends=("ckks",))
        if manifest.backend != "ckks":
            raise ArtifactError(f"{manifest.root}: a {manifest.backend} artifact, not a CKKS one; "
                                "compile with --backend ckks")
        return cls(read_client_spec(manifest), manifest.digest)

    # -- keys ------------------------------------------------------------------------------
    def use_keys(self, context: SecretContext) -> None:
        """Use an existing key set (e.g. `SecretContext.load_secret` of a saved one) for this
        model: its parameters must be the model's; its modes are those its rotations cover."""
        if not isinstance(context, SecretContext) or not context.has_secret_key():
            raise KeyMismatchError("use_keys needs a SecretContext with its secret key")
        if context.params != self.params:
            raise KeyMismatchError(f"these CKKS keys are for parameters {context.params.to_json()}, this "
                                   f"model needs {self.params.to_json()}: generate keys for this model")
        modes = tuple(m for m, steps in (("single", self.single_steps), ("batch", self.batch_steps))
                      if all(context.has_rotation(s) for s in steps)
                      and not (m == "batch" and self.batch_complex and not context.has_conjugation()))
        if not modes:
            raise KeyMismatchError("these CKKS keys lack the rotations of both packings of this model; "
                                   "generate keys for this model")
        self.context, self._ev, self.modes = context, Evaluator(context), modes

    def keygen(self, modes: tuple[str, ...] = ("single", "batch")) -> None:
        """New keys: secret, relinearisation, and Galois keys for the rotations of `modes`."""
        steps: set[int] = set()
        for mode in modes:
            if mode not in ("single", "batch"):
                raise InputError(f"unknown CKKS mode {mode!r}: single or batch")
            steps.update(self.single_steps if mode == "single" else self.batch_steps)
        conjugate = "batch" in modes and self.batch_complex
        self.context = SecretContext.create(self.params, sorted(steps), conjugate=conjugate)
        self._ev = Evaluator(self.context)
        self.modes = tuple(modes)

    def _need_keys(self) -> tuple[SecretContext, Evaluator]:
        if self.context is None or self._ev is None:
            raise KeyMismatchError("no CKKS keys yet: call keygen() first")
        return self.context, self._ev

    def evaluation_keys(self) -> bytes:
        """What the server needs: the public context, framed for this model. No secret key."""
        ctx, _ = self._need_keys()
        return frame(Kind.EVALUATION_KEYS, self.digest, ctx.serialize_public())

    # -- data ------------------------------------------------------------------------------
    def _conform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if tuple(x.shape) == self.input_shape:
            x = x[None]
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"input of shape {tuple(x.shape)}; the model takes {self.input_shape} "
                             "per sample (or a batch of them)")
        if len(x) == 0 or not np.all(np.isfinite(x)):
            raise InputError("inputs must be a non-empty batch of finite numbers")
        return x.reshape(len(x), self.n_in)

    def encrypt(self, x: np.ndarray, mode: str | None = None) -> bytes:
        """One image (mode "single", the default for one sample) or a batch (mode "batch",
        the default for several), encrypted and framed for this model."""
        ctx, ev = self._need_keys()
        flat = self._conform(x)
        mode = mode or ("single" if len(flat) == 1 else "batch")
        if mode not in self.modes:
            raise KeyMismatchError(f"these keys were made for {self.modes}, not {mode!r}: keygen again")
        slots = self.params.slots
        if mode == "single":
            if len(flat) != 1:
                raise InputError(f"mode 'single' encrypts one image, got {len(flat)}")
            if self.single_kind == "replicated":  # the image repeated with its period
                one = np.zeros(self.single_period)
                one[:self.n_in] = flat[0]
                # replica r rotated left by shift * r (the plan's first matrix expects it)
                vecs = [np.concatenate([np.roll(one, -self.single_shift * r)
                                        for r in range(slots // self.single_period)])]
            else:
                chunks = -(-self.n_in // slots)
                vecs = [flat[0, c * slots:(c + 1) * slots] for c in range(chunks)]
        else:
            if self.batch_complex:  # feature j in the real part, j + half in the imaginary part
                half = -(-self.n_in // 2)
                pad = np.zeros((len(flat), 2 * half))
                pad[:, :self.n_in] = flat
                flat = pad[:, :half] + 1j * pad[:, half:]
            per = slots // self.block
            width = flat.shape[1]
            chunks = -(-width // per)
            vecs = []
            for g in range(0, len(flat), self.block):
                part = flat[g:g + self.block]
                layout = samples_layout(len(part), width, slots, self.block)
                buf = np.zeros(chunks * slots, dtype=flat.dtype)
                buf[layout.ravel()] = part.ravel()
                vecs += [buf[c * slots:(c + 1) * slots] for c in range(chunks)]
        cts = [ev.encrypt(v) for v in vecs]
        body = dump_ciphertexts(ctx, cts, {"mode": mode, "n": len(flat)})
        return frame(Kind.INPUT_CIPHERTEXT, self.digest, body)

    def decrypt(self, data: bytes) -> np.ndarray:
        """Logits (n, n_out) from the server's output blob."""
        ctx, ev = self._need_keys()
        payload = unframe(bytes(data), Kind.OUTPUT_CIPHERTEXT, self.digest, what="CKKS output")
        cts, head, _ = load_ciphertexts(ctx, payload, what="CKKS output")
        mode, n = head.get("mode"), head.get("n")
        if mode not in ("single", "batch") or not isinstance(n, int) or n < 1:
            raise KeyMismatchError("CKKS output: its header has no valid mode and sample count")
        slots = self.params.slots
        flat = np.concatenate([ev.decrypt(ct) for ct in cts])
        if mode == "single":
            if self.output_slots.max() >= len(flat):
                raise KeyMismatchError("CKKS output: fewer ciphertexts than the model's output needs")
            out = flat[self.output_slots][None]
        else:
            per = slots // self.block
            chunks = -(-self.n_out // per)
            groups = -(-n // self.block)
            if len(cts) != chunks * groups:
                raise KeyMismatchError(f"CKKS output: {len(cts)} ciphertexts, expected {chunks * groups}")
            rows = []
            for g in range(groups):
                size = min(self.block, n - g * self.block)
                layout = samples_layout(size, self.n_out, slots, self.block)
                rows.append(flat[g * chunks * slots:(g + 1) * chunks * slots][layout])
            out = np.concatenate(rows)
        return out * self.out_scale + self.out_offset
