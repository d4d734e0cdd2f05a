"""CKKS key sets: the data owner's (with the secret key) and the compute party's (without).

Both are TenSEAL contexts underneath, with Microsoft SEAL's evaluator reached through
`tenseal.sealapi`. Keys are SEAL's; Gravel chooses which ones exist and how they travel:

- the relinearisation key, and Galois (rotation) keys for exactly the rotation steps a
  computation needs (`rotation_steps=`), or the power-of-two steps from which SEAL composes any
  rotation (the default, for eager computations whose rotations are not known in advance);
- the public context is SEAL's seeded (half-size), zstd-compressed form of those keys inside
  TenSEAL's own context message, framed like Gravel's other blobs. It is loaded by TenSEAL's
  loader on the other side, where `has_secret_key()` is False: there is no secret in the bytes.

Levels: a fresh ciphertext is at level `params.depth`; each multiplication is followed by a
rescale that drops one prime and one level; level 0 allows no further multiplication. Every
ciphertext at level l carries exactly the scale `scale_at(l)` (2^scale_bits at the top, then
S(l-1) = S(l)^2 / q(l), which is what a multiplication of two level-l ciphertexts produces), so
ciphertexts at one level can always be added and plaintexts are encoded so that products land on
it. That rule is what makes rescaling and level alignment automatic and exact.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
import tenseal as ts
from google.protobuf.message import DecodeError
from tenseal import sealapi

from gravel.ckks._sealbytes import SEAL_ERRORS, load_into, to_bytes
from gravel.ckks._tenseal_proto import ContextProto
from gravel.ckks.params import CkksParams
from gravel.errors import BlobFormatError, InputError, KeyMismatchError
from gravel.protocol.framing import HEADER_SIZE, Kind, frame, unframe

__all__ = [
    "POWER_OF_TWO",
    "PublicContext",
    "SecretContext",
    "power_of_two_steps",
]

POWER_OF_TWO = "power-of-two"
_FORMAT = 1
_META = struct.Struct("<I")


def power_of_two_steps(slots: int) -> tuple[int, ...]:
    """Rotation steps +-1, +-2, +-4, ... < slots: any rotation is a sum of a few of them."""
    steps: list[int] = []
    k = 1
    while k < slots:
        steps += [k, -k]
        k *= 2
    return tuple(steps)


def _normalize_steps(steps: Iterable[int], slots: int) -> tuple[int, ...]:
    """Rotation steps as SEAL takes them: in (-slots/2, slots/2], left for positive; 0 dropped."""
    out = set()
    for step in steps:
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            raise InputError(f"rotation steps must be integers, got {step!r}")
        s = int(step) % slots
        if s == 0:
            continue
        out.add(s if s <= slots // 2 else s - slots)
    return tuple(sorted(out, key=lambda v: (abs(v), v)))


class _KeyedContext:
    """What both parties share: parameters, public evaluation keys and SEAL's evaluator."""

    def __init__(
        self,
        params: CkksParams,
        tenseal_context: ts.Context,
        rotation_steps: tuple[int, ...],
        public_payload: bytes,
    ) -> None:
        self.params = params
        self.rotation_steps = rotation_steps
        self._ts = tenseal_context
        self._public_payload = public_payload
        self.digest = hashlib.sha256(public_payload).digest()
        raw = tenseal_context.data
        self.seal_context = raw.seal_context()
        self.encoder = sealapi.CKKSEncoder(self.seal_context)
        self.evaluator = sealapi.Evaluator(self.seal_context)
        self.encryptor = sealapi.Encryptor(self.seal_context, raw.public_key())
        self.relin_keys = raw.relin_keys() if raw.has_relin_keys() else None
        self.galois_keys = raw.galois_keys() if raw.has_galois_keys() else None
        self._galois_tool = self.seal_context.key_context_data().galois_tool()
        self._levels()

    def _levels(self) -> None:
        """Walk SEAL's modulus chain once: parms_id, dropped prime and canonical scale per level."""
        self._parms_ids: dict[int, Any] = {}
        self._level_of: dict[tuple[int, ...], int] = {}
        self._prime: dict[int, int] = {}
        data = self.seal_context.first_context_data()
        while data is not None:
            level = data.chain_index()
            pid = data.parms_id()
            self._parms_ids[level] = pid
            self._level_of[tuple(pid)] = level
            self._prime[level] = data.parms().coeff_modulus()[-1].value()
            data = data.next_context_data()
        self.top_level = max(self._parms_ids)
        if self.top_level != self.params.depth:
            raise KeyMismatchError(
                f"the SEAL modulus chain has {self.top_level} levels, the parameters say "
                f"{self.params.depth}"
            )
        scales = {self.top_level: float(2 ** self.params.scale_bits)}
        for level in range(self.top_level, 0, -1):
            s = scales[level]
            scales[level - 1] = (s * s) / float(self._prime[level])
        self._scales = scales

    # -- facts about the context -------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.params.slots

    @property
    def tenseal(self) -> ts.Context:
        """The TenSEAL context (for TenSEAL's own CKKSVector/CKKSTensor on the same keys)."""
        return self._ts

    def has_secret_key(self) -> bool:
        return bool(self._ts.has_secret_key())

    def parms_id(self, level: int) -> Any:
        return self._parms_ids[level]

    def scale_at(self, level: int) -> float:
        """The scale every ciphertext at `level` carries."""
        return self._scales[level]

    def prime_at(self, level: int) -> int:
        """The prime a rescale at `level` divides by."""
        return self._prime[level]

    def level_of(self, seal_ciphertext: Any) -> int:
        try:
            return self._level_of[tuple(seal_ciphertext.parms_id())]
        except KeyError:
            raise KeyMismatchError(
                "a ciphertext whose parameters are not in this context's modulus chain "
                "(made under other CKKS parameters?)"
            ) from None

    def galois_elt(self, step: int) -> int:
        return int(self._galois_tool.get_elt_from_step(int(step)))

    @property
    def conjugation_elt(self) -> int:
        """SEAL's Galois element of complex conjugation (2N - 1)."""
        return 2 * self.params.poly_modulus_degree - 1

    def has_conjugation(self) -> bool:
        return self.galois_keys is not None and bool(self.galois_keys.has_key(self.conjugation_elt))

    def has_rotation(self, step: int) -> bool:
        step = _normalize_steps([step], self.slots)
        if not step:
            return True
        return self.galois_keys is not None and bool(
            self.galois_keys.has_key(self.galois_elt(step[0]))
        )

    # -- the public context as bytes ---------------------------------------------------------
    def serialize_public(self) -> bytes:
        """The public context, framed (Kind.CKKS_PUBLIC_CONTEXT): no secret key in it."""
        return frame(Kind.CKKS_PUBLIC_CONTEXT, self.digest, self._public_payload)

    def public_context_size(self) -> int:
        return len(self._public_payload)


class PublicContext(_KeyedContext):
    """The compute party's context: evaluation keys only. It can encrypt (public key), add,
    multiply, rotate; it cannot decrypt."""

    @classmethod
    def load(cls, data: bytes) -> PublicContext:
        """Read `SecretContext.serialize_public()` bytes; refuses anything else by name (a
        secret-key blob, a ciphertext, a truncated or altered context)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"a public context is bytes, got {type(data).__name__}")
        data = bytes(data)
        payload = data[HEADER_SIZE:] if len(data) > HEADER_SIZE else b""
        digest = hashlib.sha256(payload).digest()
        if len(data) > HEADER_SIZE and data[:4] == b"GRVL" and data[5] == Kind.CKKS_PUBLIC_CONTEXT \
                and data[6:HEADER_SIZE] != digest:
            raise BlobFormatError("CKKS public context: damaged or truncated (its SHA-256 does not "
                                  "match the digest in its header): send it again")
        payload = unframe(data, Kind.CKKS_PUBLIC_CONTEXT, digest, what="CKKS public context")
        meta, proto_bytes = _split_meta(payload)
        params = CkksParams.from_json(meta.get("params", {}))
        steps = meta.get("rotation_steps")
        if not isinstance(steps, list):
            raise KeyMismatchError("CKKS public context: rotation_steps missing from its header")
        steps_t = _normalize_steps(steps, params.slots)
        _check_no_secret(proto_bytes)
        try:
            tctx = ts.Context.load(proto_bytes)
        except SEAL_ERRORS as exc:
            raise BlobFormatError(f"CKKS public context: TenSEAL could not load it ({exc})") from None
        if tctx.has_secret_key():  # _check_no_secret makes this unreachable; kept as a guard
            raise KeyMismatchError("CKKS public context holds a secret key; refusing it")
        ctx = cls(params, tctx, steps_t, payload)
        _check_matches(ctx, params)
        missing = [s for s in steps_t if not ctx.has_rotation(s)]
        if missing:
            raise KeyMismatchError(
                f"CKKS public context claims rotation steps {missing} but has no Galois key for "
                "them (altered?)"
            )
        return ctx


class SecretContext(_KeyedContext):
    """The data owner's context: it holds the secret key, encrypts compactly (seeded symmetric
    encryption) and decrypts. `public()` is what to give the compute party."""

    @classmethod
    def create(
        cls,
        params: CkksParams,
        rotation_steps: Iterable[int] | str | None = POWER_OF_TWO,
        conjugate: bool = False,
    ) -> SecretContext:
        """New keys for `params`: secret, public, relinearisation, and Galois keys for
        `rotation_steps` (a list of steps, POWER_OF_TWO for any rotation, None for none) and,
        with `conjugate`, for complex conjugation (what the batch path's complex packing needs)."""
        if not isinstance(params, CkksParams):
            raise InputError("SecretContext.create needs CkksParams (see gravel.ckks.choose_params)")
        if rotation_steps == POWER_OF_TWO:
            steps = power_of_two_steps(params.slots)
        elif rotation_steps is None:
            steps = ()
        elif isinstance(rotation_steps, str):
            raise InputError(f"rotation_steps must be steps, None or {POWER_OF_TWO!r}")
        else:
            steps = _normalize_steps(rotation_steps, params.slots)
        tctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
        tctx.global_scale = float(2 ** params.scale_bits)
        raw = tctx.data
        sc = raw.seal_context()
        keygen = sealapi.KeyGenerator(sc, raw.secret_key())
        proto = ContextProto()
        proto.ParseFromString(
            tctx.serialize(save_public_key=True, save_secret_key=False,
                           save_galois_keys=False, save_relin_keys=False)
        )
        proto.public_context.relin_keys = to_bytes(keygen.create_relin_keys())
        tool = sc.key_context_data().galois_tool()
        elts = {int(tool.get_elt_from_step(s)) for s in steps}
        if conjugate:
            elts.add(2 * params.poly_modulus_degree - 1)
        if elts:
            proto.public_context.galois_keys = to_bytes(keygen.create_galois_keys(sorted(elts)))
        meta = {"format": _FORMAT, "params": params.to_json(), "rotation_steps": list(steps)}
        payload = _join_meta(meta, proto.SerializeToString())
        # The secret context evaluates with exactly the keys it hands out: load them back.
        relin = load_into(sealapi.RelinKeys(), sc, proto.public_context.relin_keys)
        galois = (
            load_into(sealapi.GaloisKeys(), sc, proto.public_context.galois_keys) if elts else None
        )
        ctx = cls(params, tctx, steps, payload)
        ctx.relin_keys, ctx.galois_keys = relin, galois
        ctx.decryptor = sealapi.Decryptor(sc, raw.secret_key())
        ctx.symmetric_encryptor = sealapi.Encryptor(sc, raw.public_key(), raw.secret_key())
        return ctx

    def public(self) -> PublicContext:
        """The compute party's context, made from the very bytes it would receive."""
        return PublicContext.load(self.serialize_public())

    # -- the SECRET context as bytes (an explicit choice of its owner) -------------------------
    def serialize_secret(self) -> bytes:
        """The whole key set WITH the secret key, framed (Kind.SECRET_KEYS, digest of the public
        context): for the owner's own disk, never for another party. The public part is kept
        byte for byte, so a reloaded context has the same digest and reads the ciphertexts made
        for it.

            u32 n | public payload (n bytes, as serialize_public frames it) | SEAL secret key
        """
        proto = ContextProto()
        proto.ParseFromString(self._ts.serialize(save_public_key=False, save_secret_key=True,
                                                 save_galois_keys=False, save_relin_keys=False))
        secret = proto.private_context.secret_key
        if not secret:
            raise KeyMismatchError("this context has no secret key to save")
        body = _META.pack(len(self._public_payload)) + self._public_payload + secret
        return frame(Kind.SECRET_KEYS, self.digest, body)

    @classmethod
    def load_secret(cls, data: bytes) -> SecretContext:
        """Read `serialize_secret()` bytes; checks that the secret key belongs to the public
        keys beside it (one encryption and decryption)."""
        data = bytes(data)
        what = "CKKS secret context"
        body = data[HEADER_SIZE:]
        if len(body) < _META.size:
            raise BlobFormatError(f"{what}: truncated")
        (n,) = _META.unpack_from(body)
        if _META.size + n >= len(body):
            raise BlobFormatError(f"{what}: truncated or not a secret context")
        public_payload = body[_META.size:_META.size + n]
        secret = body[_META.size + n:]
        unframe(data, Kind.SECRET_KEYS, hashlib.sha256(public_payload).digest(), what=what)
        meta, proto_bytes = _split_meta(public_payload)
        params = CkksParams.from_json(meta.get("params", {}))
        steps = meta.get("rotation_steps")
        if not isinstance(steps, list):
            raise KeyMismatchError(f"{what}: rotation_steps missing from its header")
        proto = ContextProto()
        try:
            proto.ParseFromString(proto_bytes)
        except DecodeError:
            raise BlobFormatError(f"{what}: not a TenSEAL context message") from None
        proto.private_context.secret_key = secret
        try:
            tctx = ts.Context.load(proto.SerializeToString())
        except SEAL_ERRORS as exc:
            raise BlobFormatError(f"{what}: TenSEAL could not load it ({exc})") from None
        ctx = cls(params, tctx, _normalize_steps(steps, params.slots), public_payload)
        _check_matches(ctx, params)
        raw = tctx.data
        sc = raw.seal_context()
        try:  # as create() does: evaluate with exactly the keys handed out
            ctx.relin_keys = load_into(sealapi.RelinKeys(), sc, proto.public_context.relin_keys)
            ctx.galois_keys = (load_into(sealapi.GaloisKeys(), sc, proto.public_context.galois_keys)
                               if proto.public_context.galois_keys else None)
        except SEAL_ERRORS as exc:
            raise BlobFormatError(f"{what}: SEAL refused its keys ({exc})") from None
        ctx.decryptor = sealapi.Decryptor(sc, raw.secret_key())
        ctx.symmetric_encryptor = sealapi.Encryptor(sc, raw.public_key(), raw.secret_key())
        probe = sealapi.Plaintext()
        ctx.encoder.encode([1.0], ctx.scale_at(ctx.top_level), probe)
        sealed = sealapi.Ciphertext()
        ctx.encryptor.encrypt(probe, sealed)
        if abs(ctx.decrypt_slots(sealed)[0] - 1.0) > 1e-3:
            raise KeyMismatchError(f"{what}: its secret key does not belong to its public keys (altered?)")
        return ctx

    def decrypt_slots(self, seal_ciphertext: Any) -> np.ndarray:
        """All slots of one ciphertext, as float64."""
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(seal_ciphertext, plain)
        return np.asarray(self.encoder.decode_double(plain), dtype=np.float64)


def _join_meta(meta: dict[str, Any], proto: bytes) -> bytes:
    head = json.dumps(meta, sort_keys=True).encode()
    return _META.pack(len(head)) + head + proto


def _split_meta(payload: bytes) -> tuple[dict[str, Any], bytes]:
    if len(payload) < _META.size:
        raise BlobFormatError("CKKS public context: truncated header")
    (n,) = _META.unpack_from(payload)
    if n > 1 << 20 or _META.size + n > len(payload):
        raise BlobFormatError("CKKS public context: header length out of range (truncated?)")
    try:
        meta = json.loads(payload[_META.size:_META.size + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BlobFormatError("CKKS public context: header is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise KeyMismatchError(
            f"CKKS public context: format {meta.get('format') if isinstance(meta, dict) else '?'},"
            f" this Gravel reads format {_FORMAT}"
        )
    return meta, payload[_META.size + n:]


def _check_no_secret(proto_bytes: bytes) -> None:
    """Refuse, before TenSEAL loads it, a context message that carries a private part."""
    proto = ContextProto()
    try:
        proto.ParseFromString(proto_bytes)
    except DecodeError:
        raise BlobFormatError("CKKS public context: not a TenSEAL context message") from None
    if proto.HasField("private_context"):
        raise KeyMismatchError(
            "CKKS public context: it carries a SECRET key; a secret key must never be sent. "
            "Send SecretContext.serialize_public() instead"
        )
    if not proto.public_context.relin_keys:
        raise KeyMismatchError("CKKS public context: no relinearisation key in it")


def _check_matches(ctx: _KeyedContext, params: CkksParams) -> None:
    parms = ctx.seal_context.key_context_data().parms()
    n = parms.poly_modulus_degree()
    bits = tuple(m.bit_count() for m in parms.coeff_modulus())
    if n != params.poly_modulus_degree or bits != params.coeff_mod_bit_sizes:
        raise KeyMismatchError(
            f"CKKS public context: header says N={params.poly_modulus_degree} "
            f"{list(params.coeff_mod_bit_sizes)}, the keys are for N={n} {list(bits)}"
        )
