"""One CKKS ciphertext bound to its context, with its level; to and from SEAL's bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tenseal import sealapi

from gravel.ckks._sealbytes import SEAL_ERRORS as _SEAL_ERRORS
from gravel.ckks._sealbytes import load_into, to_bytes
from gravel.errors import KeyMismatchError

if TYPE_CHECKING:
    from gravel.ckks.context import _KeyedContext

__all__ = ["Ciphertext"]

_SCALE_TOLERANCE = 1e-9


class Ciphertext:
    """A SEAL ciphertext of `context.slots` slots at `level`, at the scale of that level.

    `compact` holds SEAL's seeded serialization of a fresh symmetric encryption (about half the
    bytes of the expanded form); it is dropped by any operation, whose results are not fresh.
    """

    __slots__ = ("compact", "context", "level", "seal")

    def __init__(self, seal: Any, context: _KeyedContext, compact: bytes | None = None) -> None:
        self.seal = seal
        self.context = context
        self.level = context.level_of(seal)
        self.compact = compact

    @property
    def scale(self) -> float:
        return float(self.seal.scale)

    def to_bytes(self) -> bytes:
        """SEAL's serialization (seeded where the ciphertext is fresh), not framed."""
        return self.compact if self.compact is not None else to_bytes(self.seal)

    @classmethod
    def from_bytes(cls, context: _KeyedContext, data: bytes, what: str = "ciphertext") -> Ciphertext:
        """SEAL's validating load against `context`, then Gravel's own checks: two components
        (relinearised), a level of this context and exactly that level's scale."""
        seal = sealapi.Ciphertext()
        try:
            load_into(seal, context.seal_context, data)
        except _SEAL_ERRORS as exc:  # SEAL refuses corrupt data or data for other parameters
            raise KeyMismatchError(f"{what}: SEAL refused it ({exc})") from None
        if seal.size() != 2:
            raise KeyMismatchError(f"{what}: {seal.size()} components, expected 2 (relinearised)")
        ct = cls(seal, context)
        expected = context.scale_at(ct.level)
        if abs(ct.scale - expected) > _SCALE_TOLERANCE * expected:
            raise KeyMismatchError(
                f"{what}: scale {ct.scale:.6g} at level {ct.level}, but this context puts every "
                f"level-{ct.level} ciphertext at {expected:.6g} (made by another program?)"
            )
        return ct
