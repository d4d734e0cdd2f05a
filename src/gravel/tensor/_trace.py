"""A dry run of encrypted-tensor code: the same EncryptedTensor operations, no cryptography.

A module's depth and the rotations its linear maps use follow from its layouts alone, and the
layouts from the code that runs. So the code is run for real on a context whose evaluator only
counts: its ciphertexts are levels, its rotations are recorded, and Gravel's own evaluator
logic (polynomials, rotate-and-sum, level alignment) runs unchanged on top of them. The result
is exactly what the real run will use: the levels, and the Galois keys to make.
"""

from __future__ import annotations

from typing import Any

from gravel.ckks.evaluator import Evaluator
from gravel.tensor.context import _TensorContext

__all__ = ["TraceContext"]

_TRACE_DEPTH = 60


class _Level:
    """Stands for a ciphertext: only its level is known."""

    __slots__ = ("level",)

    def __init__(self, level: int) -> None:
        self.level = level

    @property
    def seal(self) -> _Level:
        return self


class _Keys:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.top_level = _TRACE_DEPTH
        self.rotation_steps = ()
        self.digest = b"\0" * 32


class _CountingEvaluator(Evaluator):
    """Evaluator whose primitives only track levels and record rotation steps."""

    def __init__(self, keys: _Keys) -> None:  # no SEAL objects at all
        self.context = keys
        self.steps: set[int] = set()

    @property
    def slots(self) -> int:
        return self.context.slots

    def _own(self, *cts: Any) -> None:
        return None

    def encode(self, values: Any, level: int, scale: float) -> None:
        return None

    def encode_for_product(self, values: Any, level: int) -> None:
        self._need(level, 1, "a plaintext multiplication")

    def encrypt(self, values: Any, level: int | None = None) -> _Level:
        return _Level(self.context.top_level if level is None else level)

    def zeros(self, level: int) -> _Level:
        return _Level(level)

    def drop_to(self, ct: Any, level: int) -> Any:
        return ct if ct.level == level else _Level(level)

    def rescale(self, seal: Any) -> _Level:
        return _Level(seal.level - 1)

    def _binary(self, fn: Any, a: Any, b: Any) -> _Level:
        return _Level(min(a.level, b.level))

    def add(self, a: Any, b: Any) -> _Level:
        return _Level(min(a.level, b.level))

    sub = add

    def add_many(self, cts: Any) -> _Level:
        return _Level(min(c.level for c in cts))

    def negate(self, a: Any) -> _Level:
        return _Level(a.level)

    def add_plain(self, a: Any, values: Any) -> _Level:
        return _Level(a.level)

    def mul(self, a: Any, b: Any, op: str = "a multiplication") -> _Level:
        level = min(a.level, b.level)
        self._need(level, 1, op)
        return _Level(level - 1)

    def mul_plain(self, a: Any, values: Any, op: str = "a plaintext multiplication") -> _Level:
        self._need(a.level, 1, op)
        return _Level(a.level - 1)

    def mul_encoded(self, a: Any, plain: Any, rescale: bool = True) -> _Level:
        return _Level(a.level - 1 if rescale else a.level)

    def mul_int(self, a: Any, value: int) -> _Level:
        return _Level(a.level)

    def dot_many(self, pairs: Any, op: str = "a sum of products") -> _Level:
        level = min(c.level for pair in pairs for c in pair)
        self._need(level, 1, op)
        return _Level(level - 1)

    def rotation_plan(self, step: int) -> list[int]:
        s = int(step) % self.slots
        if s == 0:
            return []
        return [s if s <= self.slots // 2 else s - self.slots]

    def rotate(self, a: Any, step: int) -> Any:
        self.steps.update(self.rotation_plan(step))
        return a


class TraceContext(_TensorContext):
    """A context for dry runs with `slots` slots: `depth_used(tensor)` and `rotation_steps`."""

    def __init__(self, slots: int) -> None:
        self.keys = _Keys(slots)
        self.evaluator = _CountingEvaluator(self.keys)
        self._maps = {}  # type: ignore[assignment]

    @property
    def depth(self) -> int:
        return _TRACE_DEPTH

    @property
    def params(self) -> Any:
        class _P:
            integer_bits = 64

        return _P()

    @property
    def slots(self) -> int:
        return self.keys.slots

    def available_steps(self) -> None:  # type: ignore[override]
        return None  # plan as if every step gets its own key, as the real keys will

    def cached_map(self, key_parts: Any, build: Any) -> Any:
        return build()

    @property
    def rotation_steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.evaluator.steps, key=lambda s: (abs(s), s)))

    def levels_used(self, level: int) -> int:
        return _TRACE_DEPTH - level
