"""`gt.Context` (the data owner's: secret key) and `gt.PublicContext` (the compute party's)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from gravel.ckks.context import POWER_OF_TWO, SecretContext
from gravel.ckks.context import PublicContext as _PublicKeys
from gravel.ckks.evaluator import Evaluator
from gravel.ckks.packing import LinearMap
from gravel.ckks.params import CkksParams, choose_params
from gravel.errors import DepthError, InputError

if TYPE_CHECKING:
    from gravel.tensor.tensor import EncryptedTensor

__all__ = ["Context", "PublicContext"]

_MAP_CACHE = 64


class _TensorContext:
    """What both parties' contexts do: encrypt (public key), evaluate, check depth, load."""

    keys: Any
    evaluator: Evaluator

    def _setup(self, keys: Any) -> None:
        self.keys = keys
        self.evaluator = Evaluator(keys)
        self._maps: OrderedDict[bytes, Any] = OrderedDict()

    @property
    def depth(self) -> int:
        return self.keys.params.depth

    @property
    def params(self) -> CkksParams:
        return self.keys.params

    @property
    def slots(self) -> int:
        return self.keys.slots

    @property
    def digest(self) -> bytes:
        """SHA-256 of the public context's bytes: the name ciphertext blobs carry."""
        return self.keys.digest

    def has_secret_key(self) -> bool:
        return self.keys.has_secret_key()

    def serialize_public(self) -> bytes:
        """The public context as framed bytes (no secret key): what a compute party loads with
        `gt.PublicContext.load`."""
        return self.keys.serialize_public()

    def encrypt(self, tensor: Any) -> EncryptedTensor:
        """Encrypt a torch tensor, numpy array or nested list of any shape."""
        from gravel.tensor.tensor import EncryptedTensor

        return EncryptedTensor._encrypt(self, tensor)

    def require(self, level: int, levels: int, op: str) -> None:
        """Refuse, before any work, an operation needing more levels than are left."""
        if level < levels:
            used = self.depth - level
            raise DepthError(
                f"{op} needs depth {used + levels}; the context has {self.depth} "
                f"({used} used before it): create gt.Context(depth={used + levels}), or decrypt "
                "and re-encrypt the input in between"
            )

    def cached_map(self, key_parts: Iterable[Any], build: Callable[[], Any]) -> Any:
        """A linear map (and output layout) built once per distinct operation: repeated calls
        (a training loop, a module applied to many inputs) reuse its encoded diagonals."""
        h = hashlib.sha256()
        for part in key_parts:
            if isinstance(part, np.ndarray):
                h.update(str(part.dtype).encode() + str(part.shape).encode())
                h.update(np.ascontiguousarray(part).tobytes())
            else:
                h.update(repr(part).encode())
            h.update(b"|")
        key = h.digest()
        hit = self._maps.get(key)
        if hit is not None:
            self._maps.move_to_end(key)
            return hit
        value = build()
        self._maps[key] = value
        while len(self._maps) > _MAP_CACHE:
            self._maps.popitem(last=False)
        return value

    def available_steps(self) -> tuple[int, ...]:
        return self.keys.rotation_steps

    def new_map(self, *args: Any, **kwargs: Any) -> LinearMap:
        return LinearMap.from_entries(*args, available_steps=self.available_steps(), **kwargs)


class Context(_TensorContext):
    """The data owner's context: makes the keys (the secret one stays in this object),
    encrypts and decrypts.

    `depth` is the number of multiplicative levels any chain of operations may use (see each
    operation's doc for its cost); `precision` the bits after the binary point wanted at the
    end; `integer_bits` bounds decrypted magnitudes (< 2^(integer_bits-1)). `rotations`: the
    rotation steps to make Galois keys for (default: powers of two, from which any rotation is
    composed; pass `module.rotation_steps` to make only what a module needs). `params` overrides
    the choice entirely.
    """

    def __init__(
        self,
        depth: int = 4,
        *,
        precision: int = 16,
        integer_bits: int = 10,
        rotations: Iterable[int] | str | None = POWER_OF_TWO,
        min_slots: int = 1,
        params: CkksParams | None = None,
    ) -> None:
        if params is None:
            params = choose_params(depth, precision_bits=precision, integer_bits=integer_bits,
                                   min_slots=min_slots)
        elif not isinstance(params, CkksParams):
            raise InputError("params must be gravel.ckks.CkksParams")
        self._setup(SecretContext.create(params, rotation_steps=rotations))

    def public(self) -> PublicContext:
        """The compute party's context, loaded from the bytes it would receive: no secret key."""
        return PublicContext.load(self.serialize_public())

    def __repr__(self) -> str:
        p = self.params
        return (f"gt.Context(depth={p.depth}, N={p.poly_modulus_degree}, slots={p.slots}, "
                f"scale=2^{p.scale_bits}, rotations={len(self.keys.rotation_steps)})")


class PublicContext(_TensorContext):
    """The compute party's context: parameters and evaluation keys, no secret key. Encrypted
    tensors loaded with it can be computed on and serialized back; not decrypted."""

    def __init__(self, keys: _PublicKeys) -> None:
        if not isinstance(keys, _PublicKeys):
            raise InputError("gt.PublicContext is made with gt.PublicContext.load(bytes)")
        self._setup(keys)

    @classmethod
    def load(cls, data: bytes) -> PublicContext:
        """From `Context.serialize_public()` bytes; anything else is refused by name."""
        return cls(_PublicKeys.load(data))

    def __repr__(self) -> str:
        p = self.params
        return f"gt.PublicContext(depth={p.depth}, N={p.poly_modulus_degree}, slots={p.slots})"
