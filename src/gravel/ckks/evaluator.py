"""CKKS arithmetic with automatic rescaling and level alignment, on SEAL's evaluator.

Every ciphertext at level l has the scale `context.scale_at(l)` (see gravel.ckks.context). The
operations keep that true, which is what lets any two ciphertexts meet:

- a product of two level-l ciphertexts is relinearised and rescaled: level l-1, scale S(l-1);
- a plaintext (vector or scalar) multiplying a level-l ciphertext is encoded at
  S(l-1) * q(l) / S(l), so that after the rescale the product is at level l-1 and scale S(l-1);
- an integer scalar is encoded at scale 1: no rescale, no level used (x * 2, -x);
- a ciphertext is brought down to a lower level exactly, by multiplying by 1 encoded as above;
- plaintexts added to a level-l ciphertext are encoded at S(l).

Rotations use the context's Galois keys; a step without its own key is composed from keys that
exist (with the default power-of-two keys, any step: its signed binary digits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tenseal import sealapi

from gravel.ckks._sealbytes import load_into, to_bytes
from gravel.ckks.ciphertext import Ciphertext
from gravel.ckks.context import SecretContext, _KeyedContext
from gravel.errors import DepthError, InputError, KeyMismatchError

__all__ = ["Evaluator", "polyval_depth"]


def _is_small_int(value: float) -> bool:
    return float(value).is_integer() and abs(value) < 1 << 20


def _term_depth(i: int, coeff: float) -> int:
    """Levels of coeff * x^i evaluated as Evaluator.polyval does: the coefficient multiplies the
    lowest binary power (free when it is an integer), then the other powers in increasing order."""
    bits = [j for j in range(i.bit_length()) if i >> j & 1]
    depth = bits[0] + (0 if _is_small_int(coeff) else 1)
    for j in bits[1:]:
        depth = max(depth, j) + 1
    return depth


def polyval_depth(coeffs: Sequence[float] | int) -> int:
    """Levels `Evaluator.polyval` uses: for a degree (any coefficients) ceil(log2(degree + 1));
    for given coefficients, less where integer coefficients (x^2, 2x^3) multiply for free."""
    if isinstance(coeffs, int):
        return 0 if coeffs <= 0 else math.ceil(math.log2(coeffs + 1))
    c = [float(v) for v in coeffs]
    return max([_term_depth(i, v) for i, v in enumerate(c) if i > 0 and v != 0.0], default=0)


def _naf(k: int) -> list[int]:
    """Signed binary digits of k, as signed powers of two summing to k (fewest nonzero)."""
    out, bit = [], 1
    while k:
        if k & 1:
            digit = 2 - (k % 4)
            out.append(digit * bit)
            k -= digit
        k //= 2
        bit *= 2
    return out


class Evaluator:
    """The arithmetic of one context. It holds no secret; with a SecretContext it can also
    decrypt and encrypt compactly."""

    def __init__(self, context: _KeyedContext) -> None:
        self.context = context
        self._sealev = context.evaluator
        self._encoder = context.encoder
        self._ones: dict[int, Any] = {}
        self._steps_available = set(context.rotation_steps)

    # -- encoding and encryption -------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.context.slots

    def _vector(self, values: Any) -> list[float] | list[complex]:
        """Values as SEAL's encoder takes them: real, or complex where any value is (two reals
        in one slot: the batch path's input packing)."""
        arr = np.asarray(values)
        arr = arr.astype(np.complex128 if np.iscomplexobj(arr) else np.float64).ravel()
        if arr.size > self.slots:
            raise InputError(f"{arr.size} values do not fit in {self.slots} slots")
        if not np.all(np.isfinite(arr)):
            raise InputError("values to encode must be finite (found NaN or infinity)")
        return arr.tolist()

    def encode(self, values: Any, level: int, scale: float) -> Any:
        """A SEAL plaintext of `values` (a vector, zero-padded, or a scalar in every slot)."""
        plain = sealapi.Plaintext()
        pid = self.context.parms_id(level)
        if np.ndim(values) == 0:
            value = float(values)
            if not math.isfinite(value):
                raise InputError("a scalar to encode must be finite")
            self._encoder.encode(value, pid, scale, plain)
        else:
            self._encoder.encode(self._vector(values), pid, scale, plain)
        return plain

    def product_scale(self, level: int) -> float:
        """The scale at which a plaintext multiplying a level-`level` ciphertext is encoded."""
        ctx = self.context
        return ctx.scale_at(level - 1) * float(ctx.prime_at(level)) / ctx.scale_at(level)

    def encode_for_product(self, values: Any, level: int) -> Any:
        """`values` encoded to multiply a level-`level` ciphertext (then rescale)."""
        self._need(level, 1, "a plaintext multiplication")
        return self.encode(values, level, self.product_scale(level))

    def encrypt(self, values: Any, level: int | None = None) -> Ciphertext:
        """Encrypt a vector of at most `slots` values (zero-padded). A secret context encrypts
        symmetrically and keeps SEAL's seeded form for sending (half the bytes)."""
        ctx = self.context
        level = ctx.top_level if level is None else level
        plain = self.encode(values, level, ctx.scale_at(level))
        if isinstance(ctx, SecretContext):
            compact = to_bytes(ctx.symmetric_encryptor.encrypt_symmetric(plain))
            seal = load_into(sealapi.Ciphertext(), ctx.seal_context, compact)
            return Ciphertext(seal, ctx, compact=compact)
        seal = sealapi.Ciphertext()
        ctx.encryptor.encrypt(plain, seal)
        return Ciphertext(seal, ctx)

    def decrypt(self, ct: Ciphertext) -> np.ndarray:
        """All slots of `ct` (needs the secret key)."""
        self._own(ct)
        if not isinstance(self.context, SecretContext):
            raise KeyMismatchError(
                "decrypting needs the secret key; this is a public context: send the result to "
                "the data owner, who decrypts it with its own context"
            )
        return self.context.decrypt_slots(ct.seal)

    # -- checks ------------------------------------------------------------------------------
    def _own(self, *cts: Ciphertext) -> None:
        for ct in cts:
            if not isinstance(ct, Ciphertext):
                raise InputError(f"expected a gravel.ckks Ciphertext, got {type(ct).__name__}")
            if ct.context is not self.context and ct.context.digest != self.context.digest:
                raise KeyMismatchError(
                    "a ciphertext of another CKKS context (other keys): load it with the context "
                    "it was encrypted under"
                )

    def _need(self, level: int, levels: int, op: str) -> None:
        if level < levels:
            used = self.context.top_level - level
            raise DepthError(
                f"{op} needs depth {used + levels}; the context has {self.context.top_level} "
                f"(this ciphertext has {level} level{'s' if level != 1 else ''} left): create the "
                f"context with depth={used + levels}, or decrypt and re-encrypt in between"
            )

    def _wrap(self, seal: Any) -> Ciphertext:
        return Ciphertext(seal, self.context)

    def _snap_scale(self, seal: Any) -> Any:
        level = self.context.level_of(seal)
        seal.scale = self.context.scale_at(level)
        return seal

    # -- levels ------------------------------------------------------------------------------
    def drop_to(self, ct: Ciphertext, level: int) -> Ciphertext:
        """`ct` at a lower `level`, exactly (multiplied by 1 and rescaled, per level)."""
        self._own(ct)
        if level > ct.level:
            raise InputError(f"cannot raise a ciphertext from level {ct.level} to {level}")
        seal = ct.seal
        for lvl in range(ct.level, level, -1):
            one = self._ones.get(lvl)
            if one is None:
                one = self._ones[lvl] = self.encode(1.0, lvl, self.product_scale(lvl))
            out = sealapi.Ciphertext()
            self._sealev.multiply_plain(seal, one, out)
            self._sealev.rescale_to_next_inplace(out)
            seal = self._snap_scale(out)
        return ct if seal is ct.seal else self._wrap(seal)

    def align(self, *cts: Ciphertext) -> list[Ciphertext]:
        """The ciphertexts, all at the lowest of their levels."""
        low = min(ct.level for ct in cts)
        return [self.drop_to(ct, low) for ct in cts]

    def rescale(self, seal: Any) -> Ciphertext:
        """Rescale a raw product (scale S(l) * plaintext-or-ciphertext scale) to level l-1."""
        out = sealapi.Ciphertext()
        self._sealev.rescale_to_next(seal, out)
        return self._wrap(self._snap_scale(out))

    # -- arithmetic --------------------------------------------------------------------------
    def zeros(self, level: int, scale: float | None = None) -> Ciphertext:
        """A fresh encryption of 0 in every slot at `level` (public key)."""
        seal = sealapi.Ciphertext()
        self.context.encryptor.encrypt_zero(self.context.parms_id(level), seal)
        seal.scale = self.context.scale_at(level) if scale is None else scale
        return self._wrap(seal)

    def _binary(self, fn: Any, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        self._own(a, b)
        a, b = self.align(a, b)
        out = sealapi.Ciphertext()
        try:
            fn(a.seal, b.seal, out)
        except RuntimeError as exc:  # SEAL refuses to produce an all-zero ("transparent") result
            if "transparent" not in str(exc):
                raise
            return self.zeros(a.level)
        return self._wrap(out)

    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        return self._binary(self._sealev.add, a, b)

    def sub(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        return self._binary(self._sealev.sub, a, b)

    def add_many(self, cts: Sequence[Ciphertext]) -> Ciphertext:
        if not cts:
            raise InputError("add_many needs at least one ciphertext")
        self._own(*cts)
        cts = self.align(*cts)
        if len(cts) == 1:
            return cts[0]
        out = sealapi.Ciphertext()
        self._sealev.add_many([c.seal for c in cts], out)
        return self._wrap(out)

    def negate(self, a: Ciphertext) -> Ciphertext:
        self._own(a)
        out = sealapi.Ciphertext()
        self._sealev.negate(a.seal, out)
        return self._wrap(out)

    def add_plain(self, a: Ciphertext, values: Any) -> Ciphertext:
        """`a` plus a vector (zero-padded) or a scalar in every slot."""
        self._own(a)
        plain = self.encode(values, a.level, self.context.scale_at(a.level))
        out = sealapi.Ciphertext()
        self._sealev.add_plain(a.seal, plain, out)
        return self._wrap(out)

    def mul(self, a: Ciphertext, b: Ciphertext, op: str = "a multiplication") -> Ciphertext:
        """Encrypted times encrypted: one level."""
        self._own(a, b)
        a, b = self.align(a, b)
        self._need(a.level, 1, op)
        out = sealapi.Ciphertext()
        if a is b or a.seal is b.seal:
            self._sealev.square(a.seal, out)
        else:
            self._sealev.multiply(a.seal, b.seal, out)
        self._sealev.relinearize_inplace(out, self.context.relin_keys)
        return self.rescale(out)

    def square(self, a: Ciphertext, op: str = "a square") -> Ciphertext:
        return self.mul(a, a, op)

    def mul_plain(self, a: Ciphertext, values: Any, op: str = "a plaintext multiplication") -> Ciphertext:
        """Encrypted times a plain vector (zero-padded) or scalar: one level."""
        self._own(a)
        self._need(a.level, 1, op)
        if not np.any(np.asarray(values, dtype=np.float64)):
            return self.zeros(a.level - 1)
        plain = self.encode(values, a.level, self.product_scale(a.level))
        return self.mul_encoded(a, plain)

    def mul_encoded(self, a: Ciphertext, plain: Any, rescale: bool = True) -> Ciphertext:
        """Times a plaintext from `encode_for_product(..., a.level)`: one level. Without
        `rescale`, the raw product (to be summed with others of its kind, then `rescale`d once)."""
        if plain.is_zero():  # values too small for the scale: the product is 0 (SEAL refuses it)
            if rescale:
                return self.zeros(a.level - 1)
            return self.zeros(a.level, a.scale * self.product_scale(a.level))
        out = sealapi.Ciphertext()
        self._sealev.multiply_plain(a.seal, plain, out)
        return self.rescale(out) if rescale else self._wrap(out)

    def mul_int(self, a: Ciphertext, value: int) -> Ciphertext:
        """Times a (small) integer: exact, no level used."""
        self._own(a)
        value = int(value)
        if value == 0:
            return self.zeros(a.level)
        if value == 1:
            return a
        if abs(value) >= 1 << 20:
            raise InputError(f"integer multiplier {value} is too large; multiply by a float")
        out = sealapi.Ciphertext()
        if value == -1:
            self._sealev.negate(a.seal, out)
            return self._wrap(out)
        plain = self.encode(float(value), a.level, 1.0)
        self._sealev.multiply_plain(a.seal, plain, out)
        return self._wrap(out)

    def mul_scalar(self, a: Ciphertext, value: float, op: str = "a multiplication by a scalar") -> Ciphertext:
        """Times a scalar: free for integers, one level otherwise."""
        if float(value).is_integer() and abs(value) < 1 << 20:
            return self.mul_int(a, int(value))
        return self.mul_plain(a, float(value), op)

    def dot_many(self, pairs: Sequence[tuple[Ciphertext, Ciphertext]],
                 op: str = "a sum of products") -> Ciphertext:
        """sum_i a_i * b_i (slot-wise): one relinearisation and one rescale for all of them."""
        if not pairs:
            raise InputError("dot_many needs at least one pair")
        flat = [c for pair in pairs for c in pair]
        self._own(*flat)
        flat = self.align(*flat)
        self._need(flat[0].level, 1, op)
        acc = None
        for a, b in zip(flat[0::2], flat[1::2]):
            prod = sealapi.Ciphertext()
            self._sealev.multiply(a.seal, b.seal, prod)
            if acc is None:
                acc = prod
            else:
                self._sealev.add_inplace(acc, prod)
        self._sealev.relinearize_inplace(acc, self.context.relin_keys)
        return self.rescale(acc)

    # -- rotations ---------------------------------------------------------------------------
    def rotation_plan(self, step: int) -> list[int]:
        """The key steps one rotation by `step` (left) is made of; raises where none compose."""
        slots = self.slots
        s = int(step) % slots
        if s == 0:
            return []
        for cand in (s, s - slots):
            if cand in self._steps_available:
                return [cand]
        best = None
        for k in (s, s - slots):
            digits = _naf(k)
            if all(d in self._steps_available or (d % slots) == 0 for d in digits):
                digits = [d for d in digits if d % slots]
                if best is None or len(digits) < len(best):
                    best = digits
        if best is None:
            raise KeyMismatchError(
                f"rotation by {step} needs a Galois key for that step (or power-of-two keys to "
                f"compose it); this context has keys for {sorted(self._steps_available)}: create "
                "the keys with the rotation steps the computation needs"
            )
        return best

    def conjugate(self, a: Ciphertext) -> Ciphertext:
        """Complex conjugate of every slot (a key switch, like a rotation): a + conj(a) is twice
        the real part."""
        self._own(a)
        if not self.context.has_conjugation():
            raise KeyMismatchError("complex conjugation needs its Galois key; these keys have none: "
                                   "make the keys with this model's client spec")
        out = sealapi.Ciphertext()
        self._sealev.complex_conjugate(a.seal, self.context.galois_keys, out)
        return self._wrap(out)

    def rotate(self, a: Ciphertext, step: int) -> Ciphertext:
        """Slot i of the result is slot (i + step) mod slots of `a` (a left rotation)."""
        self._own(a)
        seal = a.seal
        for part in self.rotation_plan(step):
            out = sealapi.Ciphertext()
            self._sealev.rotate_vector(seal, part, self.context.galois_keys, out)
            seal = out
        return a if seal is a.seal else self._wrap(seal)

    def rotate_sum(self, a: Ciphertext, stride: int, count: int) -> Ciphertext:
        """Slot i holds sum_{t < count} a[i + t * stride]: about 2 log2(count) rotations, no
        level. Only the slots whose whole window is meaningful are meaningful."""
        if count < 1:
            raise InputError("rotate_sum needs count >= 1")
        result = None
        power, size, offset = a, 1, 0
        k = count
        while k:
            if k & 1:
                term = self.rotate(power, offset * stride) if offset else power
                result = term if result is None else self.add(result, term)
                offset += size
            k >>= 1
            if k:
                power = self.add(power, self.rotate(power, size * stride))
                size *= 2
        return result

    # -- polynomials -------------------------------------------------------------------------
    def polyval(self, a: Ciphertext, coeffs: Sequence[float], constant: Any = None,
                op: str = "polyval") -> Ciphertext:
        """sum_i coeffs[i] * a^i in ceil(log2(degree + 1)) levels. The constant term is added to
        every slot, or as `constant` (a vector: the constant times a mask) where given."""
        self._own(a)
        c = [float(v) for v in coeffs]
        while len(c) > 1 and c[-1] == 0.0:
            c.pop()
        degree = len(c) - 1
        if degree < 1:
            raise InputError(f"{op}: the polynomial has degree {degree}; it needs degree >= 1")
        if not all(math.isfinite(v) for v in c):
            raise InputError(f"{op}: coefficients must be finite")
        depth = polyval_depth(c)
        self._need(a.level, depth, f"{op} (degree {degree})")
        powers = {0: a}  # powers[j] = a^(2^j)
        for j in range(1, degree.bit_length()):
            powers[j] = self.square(powers[j - 1], op)
        terms = []
        for i in range(1, degree + 1):
            if c[i] == 0.0:
                continue
            bits = [j for j in range(i.bit_length()) if i >> j & 1]
            acc = self.mul_scalar(powers[bits[0]], c[i], op)
            for j in bits[1:]:
                acc = self.mul(acc, powers[j], op)
            terms.append(acc)
        out = self.drop_to(self.add_many(terms), a.level - depth)
        if c[0] != 0.0:
            out = self.add_plain(out, c[0] if constant is None else c[0] * np.asarray(constant))
        return out
