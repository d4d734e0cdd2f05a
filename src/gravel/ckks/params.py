"""CKKS parameters for a multiplicative depth and a precision, at 128-bit security.

CKKS has no bootstrapping here, so the depth of a computation (the longest chain of
multiplications, each followed by a rescale that drops one prime of the coefficient modulus) is a
budget fixed when the keys are made. A parameter set is a ring size N (N/2 slots) and a chain of
primes:

    [first] + [scale] * depth + [special]

- every middle prime has `scale_bits` bits, the scale at which values are encoded, so that a
  rescale after a multiplication brings the scale back to about 2^scale_bits;
- `first` (the prime left at the last level) has `scale_bits + integer_bits` bits: decrypted
  values must stay below 2^(integer_bits - 1) in magnitude;
- `special` is the key-switching prime: at least as large as `first`, and given whatever the
  security budget leaves (up to 60 bits), since key switching (rotations, relinearisation) adds
  noise in proportion to the largest data prime over the special prime.

The total bit count must not exceed what the HomomorphicEncryption.org standard allows for 128-bit
classical security with a ternary secret (the table SEAL enforces): N=4096: 109 bits, 8192: 218,
16384: 438, 32768: 881. SEAL refuses anything above it; this module chooses within it and says
what to change when nothing fits.

Precision, measured with SEAL on this machine (values in [-1, 1], the worst slot of N/2): a fresh
ciphertext is accurate to about 2^-(scale_bits - log2 N), and a chain of squarings loses about
3/4 bit per level. `choose_params` sizes the scale from those two facts. Rotations and
relinearisations add key-switching noise that depends on the special prime: where the budget
leaves it barely above the first prime (N=4096), a rotation costs about 4 of those bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gravel.errors import DepthError, InputError

__all__ = [
    "MAX_PRIME_BITS",
    "MIN_PRIME_BITS",
    "SECURITY_TABLE_128",
    "CkksParams",
    "choose_params",
    "max_depth",
]

# HomomorphicEncryption.org security standard (2018), classical 128-bit, ternary secret:
# the largest total coefficient-modulus bit count for each ring size.
SECURITY_TABLE_128: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60  # SEAL's limit for one prime of the coefficient modulus
MIN_PRIME_BITS = 20  # below this, too few NTT-friendly primes exist for large rings


@dataclass(frozen=True)
class CkksParams:
    """One CKKS parameter set; checked against the 128-bit table when made."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        n, bits = self.poly_modulus_degree, tuple(int(b) for b in self.coeff_mod_bit_sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if n not in SECURITY_TABLE_128:
            raise InputError(
                f"poly_modulus_degree {n} is not in the 128-bit security table; "
                f"use one of {sorted(SECURITY_TABLE_128)}"
            )
        if len(bits) < 2:
            raise InputError(
                "the coefficient modulus needs at least two primes (data and key-switching)"
            )
        bad = [b for b in bits if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS]
        if bad:
            raise InputError(
                f"prime sizes {bad} are outside [{MIN_PRIME_BITS}, {MAX_PRIME_BITS}] bits"
            )
        if not MIN_PRIME_BITS <= self.scale_bits <= MAX_PRIME_BITS:
            raise InputError(f"scale_bits {self.scale_bits} is outside [20, 60]")
        if any(b != self.scale_bits for b in bits[1:-1]):
            raise InputError(
                f"the middle primes {list(bits[1:-1])} must all have scale_bits={self.scale_bits} "
                "bits, so that each rescale restores the scale"
            )
        if bits[0] <= self.scale_bits:
            raise InputError(
                f"the first prime ({bits[0]} bits) must be larger than the scale "
                f"({self.scale_bits} bits), or decrypted values have no integer part"
            )
        limit = SECURITY_TABLE_128[n]
        if sum(bits) > limit:
            raise InputError(
                f"{sum(bits)} bits of coefficient modulus exceed the {limit} bits that N={n} "
                "allows at 128-bit security: use a larger ring, fewer levels or a smaller scale"
            )

    @property
    def depth(self) -> int:
        """Multiplications (rescales) a fresh ciphertext can go through."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def integer_bits(self) -> int:
        """Bits above the binary point at the last level: |decrypted value| < 2^(this - 1)."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits

    @property
    def precision_bits(self) -> float:
        """Expected bits after the binary point of a fresh ciphertext (see the module doc)."""
        return self.scale_bits - math.log2(self.poly_modulus_degree)

    @property
    def security_bits(self) -> int:
        return 128

    def to_json(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CkksParams:
        """Read what `to_json` wrote (a manifest, a blob header); every field is re-checked."""
        try:
            n = data["poly_modulus_degree"]
            bits = data["coeff_mod_bit_sizes"]
            scale = data["scale_bits"]
        except (KeyError, TypeError):
            raise InputError(
                "CKKS parameters need poly_modulus_degree, coeff_mod_bit_sizes and scale_bits"
            ) from None
        if not (
            isinstance(n, int)
            and isinstance(scale, int)
            and isinstance(bits, list)
            and all(isinstance(b, int) for b in bits)
        ):
            raise InputError("CKKS parameters must be integers (and a list of integers)")
        return cls(n, tuple(bits), scale)


def _scale_bits(precision_bits: int, depth: int, n: int) -> int:
    return precision_bits + int(math.log2(n)) + math.ceil(3 * depth / 4)


def _fit(depth: int, precision_bits: int, integer_bits: int, min_slots: int,
         tried: list[str] | None = None) -> CkksParams | None:
    for n in sorted(SECURITY_TABLE_128):
        if n // 2 < min_slots:
            continue
        scale = max(MIN_PRIME_BITS, _scale_bits(precision_bits, depth, n))
        first = scale + integer_bits
        if first > MAX_PRIME_BITS:
            if tried is not None:
                tried.append(f"N={n}: a {scale}-bit scale plus {integer_bits} integer bits "
                             f"exceeds {MAX_PRIME_BITS}-bit primes")
            continue
        bits = (first,) + (scale,) * depth + (first,)
        if sum(bits) <= SECURITY_TABLE_128[n]:
            # Spare bits go to the key-switching prime: rotations and relinearisations add
            # noise in proportion to (largest prime) / (special prime).
            special = min(MAX_PRIME_BITS, first + SECURITY_TABLE_128[n] - sum(bits))
            return CkksParams(n, bits[:-1] + (special,), scale)
        if tried is not None:
            tried.append(f"N={n}: {sum(bits)} bits > {SECURITY_TABLE_128[n]}")
    return None


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")


def choose_params(
    depth: int,
    *,
    precision_bits: int = 16,
    integer_bits: int = 10,
    min_slots: int = 1,
) -> CkksParams:
    """The smallest secure ring (fastest, smallest keys) giving `depth` levels with about
    `precision_bits` bits after the binary point at the end, values up to 2^(integer_bits-1) and
    at least `min_slots` slots. Refuses, naming what to change, where no ring of the table fits."""
    _check_int("depth", depth, 0)
    _check_int("precision_bits", precision_bits, 1)
    _check_int("integer_bits", integer_bits, 1)
    _check_int("min_slots", min_slots, 1)
    tried: list[str] = []
    params = _fit(depth, precision_bits, integer_bits, min_slots, tried)
    if params is not None:
        return params
    best = max_depth(precision_bits=precision_bits, integer_bits=integer_bits, min_slots=min_slots)
    hint = (
        f"at {precision_bits} bits of precision the deepest secure parameters give depth {best}"
        if best >= 0
        else f"nothing fits {precision_bits} bits of precision with {integer_bits} integer bits"
    )
    raise DepthError(
        f"no 128-bit-secure CKKS parameters give depth {depth} ({'; '.join(tried)}); {hint}: "
        "lower the depth (fewer multiplications, lower-degree polynomials) or the precision, "
        "or split the computation and re-encrypt in between"
    )


def max_depth(*, precision_bits: int = 16, integer_bits: int = 10, min_slots: int = 1) -> int:
    """The largest depth `choose_params` can satisfy with these settings (-1 if none)."""
    best = -1
    for depth in range(64):
        if _fit(depth, precision_bits, integer_bits, min_slots) is None:
            break
        best = depth
    return best
