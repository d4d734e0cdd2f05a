"""EncryptedTensor: a CKKS-encrypted tensor with torch-like shapes, broadcasting and operators.

The values live in the slots of one or more ciphertexts; `layout` (a numpy array of the tensor's
shape) says which global slot holds each element (see gravel.ckks.packing). Reshape, transpose,
permute and indexing rewrite the layout only. Arithmetic runs on whole ciphertexts (all elements
at once); linear operations with plain weights (matmul, conv2d, pooling, sums) are linear maps
by the diagonal method.

Depth (levels) each operation uses; a context of depth D allows any chain whose costs add up
to at most D:

    + - (scalars, plain or encrypted tensors), negation, x * int       0
    x * float, x * plain tensor, x * encrypted tensor, square           1
    x @ plain matrix, conv2d, avg_pool2d, sum/mean over dims, dot       1
    x @ encrypted matrix                                                3 (dot of two vectors: 2)
    polyval / polynomial activations of degree d                        ceil(log2(d + 1))
    reshape, transpose, permute, indexing                               0
    broadcasting an encrypted operand to a larger shape                 1 (a re-layout)

Levels of two operands are aligned automatically; scales are exact (gravel.ckks.evaluator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gravel.ckks.blob import dump_ciphertexts, load_ciphertexts
from gravel.ckks.ciphertext import Ciphertext
from gravel.ckks.evaluator import polyval_depth
from gravel.ckks.packing import (
    avg_pool2d_map,
    contiguous_layout,
    conv2d_map,
    gather_map,
    matmul_map,
    n_chunks,
    sum_map,
)
from gravel.errors import BlobFormatError, InputError, KeyMismatchError

if TYPE_CHECKING:
    from gravel.tensor.approx import Approximation
    from gravel.tensor.context import _TensorContext

__all__ = ["EncryptedTensor"]

_FORMAT = 1
_MAX_ELEMENTS = 1 << 26
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _plain(value: Any, op: str) -> np.ndarray:
    """A plain operand as float64 numpy (torch tensors, numpy arrays, lists, scalars)."""
    if isinstance(value, torch.Tensor):
        arr = value.detach().cpu().to(torch.float64).numpy()
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{op}: cannot use a {type(value).__name__} as a plain operand") from None
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{op}: the plain operand has NaN or infinite values")
    return arr


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...], op: str) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise InputError(f"{op}: shapes {a} and {b} do not broadcast") from None


class EncryptedTensor:
    """An encrypted tensor. Make one with `ctx.encrypt(tensor)`; read it with `.decrypt()` on the
    context holding the secret key; send it with `.serialize()` / `EncryptedTensor.load`."""

    __slots__ = ("cts", "ctx", "dtype", "layout")
    __array_ufunc__ = None  # numpy defers `ndarray * x`, `ndarray @ x` to this class's r-methods

    def __init__(self, ctx: _TensorContext, cts: Sequence[Ciphertext], layout: np.ndarray,
                 dtype: torch.dtype = torch.float32) -> None:
        self.ctx = ctx
        self.layout = np.asarray(layout, dtype=np.int64)
        self.dtype = dtype
        used = np.unique(self.layout // ctx.slots) if self.layout.size else np.zeros(0, np.int64)
        if len(used) and (len(used) != len(cts) or used[-1] != len(used) - 1):
            # drop ciphertexts no element lives in any more (after indexing): less to carry
            # and nothing of the dropped elements is sent on
            remap = np.full(len(cts), -1, dtype=np.int64)
            remap[used] = np.arange(len(used))
            chunk, slot = np.divmod(self.layout, ctx.slots)
            self.layout = remap[chunk] * ctx.slots + slot
            cts = [cts[i] for i in used]
        self.cts = ctx.evaluator.align(*cts) if len(cts) > 1 else list(cts)

    # -- making and reading -----------------------------------------------------------------
    @classmethod
    def _encrypt(cls, ctx: _TensorContext, tensor: Any) -> EncryptedTensor:
        if isinstance(tensor, EncryptedTensor):
            raise InputError("encrypt: the tensor is already encrypted")
        dtype = tensor.dtype if isinstance(tensor, torch.Tensor) and tensor.dtype in (
            torch.float32, torch.float64) else torch.float32
        values = _plain(tensor, "encrypt")
        if values.size > _MAX_ELEMENTS:
            raise InputError(f"encrypt: {values.size} elements; at most {_MAX_ELEMENTS}")
        bound = 2.0 ** (ctx.params.integer_bits - 1)
        if values.size and np.max(np.abs(values)) >= bound:
            raise InputError(
                f"encrypt: values up to {np.max(np.abs(values)):.4g} in magnitude; this context "
                f"decrypts values below {bound:g}: scale the data down or create the context "
                "with more integer_bits"
            )
        layout = contiguous_layout(values.shape, ctx.slots)
        cts = [ctx.evaluator.encrypt(vec) for vec in cls._scatter(ctx, layout, values)]
        if not cts:
            raise InputError("encrypt: an empty tensor has nothing to encrypt")
        return cls(ctx, cts, layout, dtype)

    @staticmethod
    def _scatter(ctx: _TensorContext, layout: np.ndarray, values: np.ndarray | float) -> list[np.ndarray]:
        """Slot vectors, one per ciphertext, holding `values` (broadcast to the layout's shape)
        at the layout's slots and 0 elsewhere."""
        slots = ctx.slots
        count = n_chunks(layout, slots)
        buf = np.zeros(count * slots)
        buf[layout.ravel()] = np.broadcast_to(values, layout.shape).ravel()
        return [buf[i * slots:(i + 1) * slots] for i in range(count)]

    def decrypt(self) -> torch.Tensor:
        """The values (needs the context with the secret key)."""
        from gravel.tensor.context import Context

        if not isinstance(self.ctx, Context):
            raise KeyMismatchError(
                "decrypt needs the secret key: this tensor belongs to a public context; "
                "serialize it and let the data owner load it with its gt.Context"
            )
        buf = np.concatenate([self.ctx.evaluator.decrypt(ct) for ct in self.cts])
        return torch.from_numpy(np.array(buf[self.layout], dtype=np.float64).reshape(self.layout.shape)).to(self.dtype)

    # -- facts ------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.layout.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return self.layout.ndim

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return int(self.layout.size)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d encrypted tensor")
        return self.shape[0]

    @property
    def level(self) -> int:
        """Multiplicative levels left."""
        return self.cts[0].level

    @property
    def depth_used(self) -> int:
        return self.ctx.depth - self.level

    def __repr__(self) -> str:
        return (f"EncryptedTensor(shape={tuple(self.shape)}, level={self.level}/{self.ctx.depth}, "
                f"ciphertexts={len(self.cts)})")

    def __bool__(self) -> bool:
        raise TypeError("the truth value of an encrypted tensor is unknown without decrypting")

    def _like(self, cts: Sequence[Ciphertext], layout: np.ndarray | None = None) -> EncryptedTensor:
        return EncryptedTensor(self.ctx, cts, self.layout if layout is None else layout, self.dtype)

    @property
    def _ev(self) -> Any:
        return self.ctx.evaluator

    # -- layout-only operations -------------------------------------------------------------
    def reshape(self, *shape: Any) -> EncryptedTensor:
        """Free: the layout is reshaped, the ciphertexts are untouched."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        try:
            return self._like(self.cts, self.layout.reshape(tuple(int(s) for s in shape)))
        except ValueError:
            raise InputError(f"reshape: cannot view {tuple(self.shape)} as {tuple(shape)} "
                             f"({self.numel()} elements)") from None

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> EncryptedTensor:
        shape = list(self.shape)
        if not shape:
            return self.reshape(1)
        s, e = start_dim % len(shape), end_dim % len(shape)
        return self.reshape(shape[:s] + [math.prod(shape[s:e + 1])] + shape[e + 1:])

    def transpose(self, dim0: int, dim1: int) -> EncryptedTensor:
        """Free (the layout is transposed)."""
        try:
            return self._like(self.cts, np.swapaxes(self.layout, dim0, dim1))
        except (ValueError, IndexError):
            raise InputError(f"transpose: dims {dim0}, {dim1} of a {self.ndim}-d tensor") from None

    @property
    def T(self) -> EncryptedTensor:
        return self._like(self.cts, self.layout.T)

    def permute(self, *dims: Any) -> EncryptedTensor:
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if sorted(d % max(self.ndim, 1) for d in dims) != list(range(self.ndim)):
            raise InputError(f"permute: {dims} is not a permutation of {self.ndim} dims")
        return self._like(self.cts, np.transpose(self.layout, dims))

    def unsqueeze(self, dim: int) -> EncryptedTensor:
        return self._like(self.cts, np.expand_dims(self.layout, dim % (self.ndim + 1)))

    def squeeze(self, dim: int | None = None) -> EncryptedTensor:
        if dim is None:
            return self._like(self.cts, np.squeeze(self.layout))
        if self.shape[dim] != 1:
            return self
        return self._like(self.cts, np.squeeze(self.layout, axis=dim))

    def __getitem__(self, index: Any) -> EncryptedTensor:
        """Indexing and slicing: free, unless an element is picked twice (then one re-layout)."""
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        try:
            layout = self.layout[index]
        except (IndexError, TypeError) as exc:
            raise InputError(f"index {index!r} on shape {tuple(self.shape)}: {exc}") from None
        layout = np.asarray(layout)
        if layout.size == 0:
            raise InputError("indexing gave an empty tensor; encrypted tensors hold at least one element")
        if len(np.unique(layout)) != layout.size:
            return self._moved(layout, contiguous_layout(layout.shape, self.ctx.slots), "indexing")
        return self._like(self.cts, layout)

    def expand(self, *shape: Any) -> EncryptedTensor:
        """Broadcast to a larger shape: one re-layout (a level)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        target = _broadcast_shape(tuple(self.shape), tuple(shape), "expand")
        return self._broadcast_to(target, "expand")

    # -- re-layouts -------------------------------------------------------------------------
    def _moved(self, source: np.ndarray, target: np.ndarray, op: str) -> EncryptedTensor:
        """A new tensor whose element e sits at `target[e]`, read from `source[e]` of self."""
        self.ctx.require(self.level, 1, op)
        slots = self.ctx.slots
        lm = self.ctx.cached_map(
            ("gather", source, target),
            lambda: gather_map(target, source, slots, n_chunks(target, slots),
                               available_steps=self.ctx.available_steps()))
        return self._like(lm.apply(self._ev, self.cts, op), target)

    def _broadcast_to(self, shape: tuple[int, ...], op: str) -> EncryptedTensor:
        if tuple(self.shape) == tuple(shape):
            return self
        source = np.broadcast_to(self.layout, shape)
        return self._moved(source, contiguous_layout(shape, self.ctx.slots), op)

    def _matched(self, other: EncryptedTensor, op: str) -> tuple[EncryptedTensor, EncryptedTensor]:
        """Both operands on one layout of the broadcast shape (a re-layout where they differ)."""
        if other.ctx.digest != self.ctx.digest:
            raise KeyMismatchError(
                f"{op}: the operands are encrypted under different contexts (other keys): "
                "encrypt both with one context"
            )
        shape = _broadcast_shape(tuple(self.shape), tuple(other.shape), op)
        la = np.broadcast_to(self.layout, shape)
        lb = np.broadcast_to(other.layout, shape)
        if (np.array_equal(la, lb) and tuple(self.shape) == shape == tuple(other.shape)
                and len(self.cts) == len(other.cts)):
            return self, other
        full_a, full_b = tuple(self.shape) == shape, tuple(other.shape) == shape
        if full_a and full_b:
            # move the operand with more levels left into the other's layout
            if self.level > other.level:
                return self._moved(la, lb, op), other
            return self, other._moved(lb, la, op)
        if full_a:
            return self, other._moved(lb, self.layout, op)
        if full_b:
            return self._moved(la, other.layout, op), other
        target = contiguous_layout(shape, self.ctx.slots)
        return self._moved(la, target, op), other._moved(lb, target, op)

    # -- arithmetic -------------------------------------------------------------------------
    def _mask(self, value: float | np.ndarray) -> list[np.ndarray]:
        return self._scatter(self.ctx, self.layout, value)

    def _add_plain(self, values: np.ndarray, sign: float, op: str) -> EncryptedTensor:
        x = self
        shape = _broadcast_shape(tuple(x.shape), values.shape, op)
        if shape != tuple(x.shape):
            x = x._broadcast_to(shape, op)
        vecs = x._mask(sign * values)
        return x._like([x._ev.add_plain(ct, v) for ct, v in zip(x.cts, vecs)])

    def __add__(self, other: Any) -> EncryptedTensor:
        if isinstance(other, EncryptedTensor):
            a, b = self._matched(other, "add")
            return a._like([a._ev.add(x, y) for x, y in zip(a.cts, b.cts)])
        return self._add_plain(_plain(other, "add"), 1.0, "add")

    __radd__ = __add__

    def __sub__(self, other: Any) -> EncryptedTensor:
        if isinstance(other, EncryptedTensor):
            a, b = self._matched(other, "sub")
            return a._like([a._ev.sub(x, y) for x, y in zip(a.cts, b.cts)])
        return self._add_plain(_plain(other, "sub"), -1.0, "sub")

    def __rsub__(self, other: Any) -> EncryptedTensor:
        return (-self)._add_plain(_plain(other, "sub"), 1.0, "sub")

    def __neg__(self) -> EncryptedTensor:
        return self._like([self._ev.negate(ct) for ct in self.cts])

    def __mul__(self, other: Any) -> EncryptedTensor:
        if isinstance(other, EncryptedTensor):
            a, b = self._matched(other, "mul")
            a.ctx.require(min(a.level, b.level), 1, "mul")
            return a._like([a._ev.mul(x, y, "mul") for x, y in zip(a.cts, b.cts)])
        values = _plain(other, "mul")
        if values.ndim == 0:
            value = float(values)
            if not (value.is_integer() and abs(value) < 1 << 20):
                self.ctx.require(self.level, 1, "mul by a scalar")
            return self._like([self._ev.mul_scalar(ct, value, "mul") for ct in self.cts])
        x = self
        shape = _broadcast_shape(tuple(x.shape), values.shape, "mul")
        x.ctx.require(x.level, 1 + (shape != tuple(x.shape)), "mul by a plain tensor")
        if shape != tuple(x.shape):
            x = x._broadcast_to(shape, "mul")
        vecs = x._mask(values)
        return x._like([x._ev.mul_plain(ct, v, "mul") for ct, v in zip(x.cts, vecs)])

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> EncryptedTensor:
        if isinstance(other, EncryptedTensor):
            raise InputError(
                "division by an encrypted tensor: CKKS has no division; multiply by a polynomial "
                "approximation of 1/x on a known range (gravel.tensor.approx.fit)"
            )
        values = _plain(other, "div")
        if np.any(values == 0):
            raise InputError("div: division by zero in the plain operand")
        return self * (1.0 / values)

    def square(self) -> EncryptedTensor:
        """One level."""
        self.ctx.require(self.level, 1, "square")
        return self._like([self._ev.square(ct, "square") for ct in self.cts])

    def __pow__(self, exponent: int) -> EncryptedTensor:
        if not isinstance(exponent, int) or exponent < 1:
            raise InputError("pow: only positive integer exponents (a polynomial) are supported")
        coeffs = [0.0] * exponent + [1.0]
        return self.polyval(coeffs)

    # -- reductions -------------------------------------------------------------------------
    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> EncryptedTensor:
        """Sum over `dim` (all dims when None): one level."""
        return self._reduce(dim, keepdim, mean=False)

    def mean(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> EncryptedTensor:
        """Mean over `dim`: one level (the 1/n is folded into the sum's mask)."""
        return self._reduce(dim, keepdim, mean=True)

    def _reduce(self, dim: Any, keepdim: bool, mean: bool) -> EncryptedTensor:
        op = "mean" if mean else "sum"
        nd = self.ndim
        if dim is None:
            dims = list(range(nd))
        else:
            dims = [dim] if isinstance(dim, int) else list(dim)
            try:
                dims = sorted({d % nd if nd else d for d in dims})
            except ZeroDivisionError:
                dims = []
            if any(d < 0 or d >= max(nd, 1) for d in dims):
                raise InputError(f"{op}: dim {dim} out of range for a {nd}-d tensor")
        if nd == 0 or not dims:
            return self
        keep = [d for d in range(nd) if d not in dims]
        moved = np.transpose(self.layout, keep + dims)
        kept_shape = [self.layout.shape[d] for d in keep]
        n = math.prod(self.layout.shape[d] for d in dims)
        rows = moved.reshape(kept_shape + [n])
        scale = 1.0 / n if mean else 1.0
        out_shape = [1 if d in dims else self.layout.shape[d] for d in range(nd)] if keepdim \
            else kept_shape
        if n == 1:
            return self._like(self.cts, rows[..., 0]).reshape(out_shape)
        self.ctx.require(self.level, 1, op)
        out_layout = self._rotate_reduce(rows, scale, op)
        if out_layout is None:
            slots = self.ctx.slots
            lm, out_layout = self.ctx.cached_map(
                ("sum", rows, scale),
                lambda: sum_map(rows, -1, slots, scale, self.ctx.available_steps()))
            cts = lm.apply(self._ev, self.cts, op)
        else:
            out_layout, cts = out_layout
        return self._like(cts, out_layout).reshape(out_shape)

    def _rotate_reduce(self, rows: np.ndarray, scale: float, op: str) -> Any:
        """Sum rows whose elements are equally spaced in one ciphertext by rotate-and-sum
        (about 2 log2(n) rotations per ciphertext), then a mask keeps the first slot of each
        row (the level). None where the layout does not allow it."""
        slots = self.ctx.slots
        flat = rows.reshape(-1, rows.shape[-1])
        steps = flat[:, 1:] - flat[:, :-1]
        stride = int(steps.flat[0])
        if stride == 0 or not np.all(steps == stride):
            return None
        if np.any(flat[:, 0] // slots != flat[:, -1] // slots) or abs(stride) * flat.shape[1] > slots:
            return None
        n = flat.shape[1]
        out_layout = rows[..., 0]
        vecs = self._scatter(self.ctx, out_layout, scale)
        cts = []
        for c, ct in enumerate(self.cts):
            if c >= len(vecs) or not np.any(vecs[c]):
                cts.append(self._ev.zeros(self.level - 1))  # dropped by the constructor
                continue
            cts.append(self._ev.mul_plain(self._ev.rotate_sum(ct, stride, n), vecs[c], op))
        return out_layout, cts

    # -- products ---------------------------------------------------------------------------
    def __matmul__(self, other: Any) -> EncryptedTensor:
        if isinstance(other, EncryptedTensor):
            return self._matmul_encrypted(other)
        weight = _plain(other, "matmul")
        if weight.ndim == 1:
            return (self @ weight[:, None]).squeeze(-1)
        if weight.ndim != 2:
            raise InputError(f"matmul: a plain operand of shape {weight.shape}; use a vector or a matrix")
        x = self.unsqueeze(0) if self.ndim == 1 else self
        self.ctx.require(x.level, 1, "matmul")
        slots = self.ctx.slots
        lm, out_layout = self.ctx.cached_map(
            ("matmul", x.layout, weight),
            lambda: matmul_map(weight, x.layout, slots, self.ctx.available_steps()))
        out = self._like(lm.apply(self._ev, x.cts, "matmul"), out_layout)
        return out.squeeze(0) if self.ndim == 1 else out

    def __rmatmul__(self, other: Any) -> EncryptedTensor:
        """plain @ encrypted, as (x^T @ plain^T)^T: transposes are free."""
        weight = _plain(other, "matmul")
        if weight.ndim == 1:
            if self.ndim == 1:
                return self @ weight
            return (self.transpose(-1, -2) @ weight)
        if weight.ndim != 2:
            raise InputError(f"matmul: a plain operand of shape {weight.shape}; use a vector or a matrix")
        if self.ndim == 1:
            return self @ weight.T
        return (self.transpose(-1, -2) @ weight.T).transpose(-1, -2)

    def _matmul_encrypted(self, other: EncryptedTensor) -> EncryptedTensor:
        if self.ndim == 1 and other.ndim == 1:
            return self.dot(other)
        self.ctx.require(min(self.level, other.level), 3, "matmul of two encrypted tensors")
        a = self.unsqueeze(0) if self.ndim == 1 else self
        b = other.unsqueeze(-1) if other.ndim == 1 else other
        if a.shape[-1] != b.shape[-2]:
            raise InputError(f"matmul: shapes {tuple(self.shape)} and {tuple(other.shape)} "
                             "do not chain (last of the first != second-to-last of the second)")
        prod = a.unsqueeze(-1) * b.unsqueeze(-3)  # (..., m, n, p)
        out = prod.sum(dim=-2)
        if self.ndim == 1:
            out = out.squeeze(-2)
        if other.ndim == 1:
            out = out.squeeze(-1)
        return out

    def dot(self, other: Any) -> EncryptedTensor:
        """Inner product of two vectors: one level with a plain vector, two with an encrypted."""
        if self.ndim != 1:
            raise InputError(f"dot takes vectors; this tensor has shape {tuple(self.shape)}")
        if isinstance(other, EncryptedTensor):
            if other.shape != self.shape:
                raise InputError(f"dot: shapes {tuple(self.shape)} and {tuple(other.shape)}")
            self.ctx.require(min(self.level, other.level), 2, "dot of two encrypted vectors")
            return (self * other).sum()
        vec = _plain(other, "dot")
        if vec.shape != tuple(self.shape):
            raise InputError(f"dot: shapes {tuple(self.shape)} and {vec.shape}")
        return self @ vec

    # -- polynomials ------------------------------------------------------------------------
    def polyval(self, coeffs: Sequence[float]) -> EncryptedTensor:
        """sum_i coeffs[i] * x^i, element-wise (coefficients from the constant term up), in
        ceil(log2(degree + 1)) levels (less where integer coefficients allow: x^2 takes one)."""
        try:
            c = [float(v) for v in coeffs]
        except (TypeError, ValueError):
            raise InputError("polyval: coefficients must be numbers, constant term first") from None
        while len(c) > 1 and c[-1] == 0.0:
            c.pop()
        if not c:
            raise InputError("polyval: no coefficients")
        if len(c) == 1:
            return self * 0 + c[0]
        degree = len(c) - 1
        self.ctx.require(self.level, polyval_depth(c), f"polyval of degree {degree}")
        masks = self._mask(1.0)
        return self._like([self._ev.polyval(ct, c, constant=m, op="polyval")
                           for ct, m in zip(self.cts, masks)])

    def approx(self, approximation: Approximation) -> EncryptedTensor:
        """Apply a gravel.tensor.approx polynomial (valid on its stated range)."""
        return self.polyval(approximation.coeffs)

    def sigmoid(self, low: float = -8.0, high: float = 8.0, degree: int = 3) -> EncryptedTensor:
        from gravel.tensor import approx

        return self.approx(approx.sigmoid(low, high, degree))

    def tanh(self, low: float = -4.0, high: float = 4.0, degree: int = 5) -> EncryptedTensor:
        from gravel.tensor import approx

        return self.approx(approx.tanh(low, high, degree))

    def relu(self, low: float = -4.0, high: float = 4.0, degree: int = 4) -> EncryptedTensor:
        from gravel.tensor import approx

        return self.approx(approx.relu(low, high, degree))

    # -- convolution and pooling (plain kernels) --------------------------------------------
    def conv2d(self, kernel: Any, bias: Any = None, stride: int = 1, padding: int = 0) -> EncryptedTensor:
        """Cross-correlation as torch.nn.functional.conv2d of an input (C, H, W) or
        (N, C, H, W) with a plain kernel (Co, C, kh, kw): one level (bias: none)."""
        k = _plain(kernel, "conv2d")
        if k.ndim == 2:
            k = k[None, None]
        x = self.unsqueeze(0) if self.ndim == 3 else self
        if x.ndim != 4:
            raise InputError(f"conv2d takes an input (C, H, W) or (N, C, H, W), got {tuple(self.shape)}")
        self.ctx.require(x.level, 1, "conv2d")
        slots = self.ctx.slots
        lm, out_layout = self.ctx.cached_map(
            ("conv2d", x.layout, k, stride, padding),
            lambda: conv2d_map(k, x.layout, slots, stride, padding, self.ctx.available_steps()))
        out = self._like(lm.apply(self._ev, x.cts, "conv2d"), out_layout)
        if bias is not None:
            b = _plain(bias, "conv2d bias")
            out = out + b.reshape(-1, 1, 1)
        return out.squeeze(0) if self.ndim == 3 else out

    def avg_pool2d(self, kernel_size: int, stride: int | None = None) -> EncryptedTensor:
        """As torch.nn.functional.avg_pool2d without padding: one level."""
        x = self.unsqueeze(0) if self.ndim == 3 else self
        if x.ndim != 4:
            raise InputError(f"avg_pool2d takes an input (C, H, W) or (N, C, H, W), got {tuple(self.shape)}")
        self.ctx.require(x.level, 1, "avg_pool2d")
        slots = self.ctx.slots
        lm, out_layout = self.ctx.cached_map(
            ("avg_pool2d", x.layout, kernel_size, stride),
            lambda: avg_pool2d_map(x.layout, kernel_size, stride, slots, self.ctx.available_steps()))
        out = self._like(lm.apply(self._ev, x.cts, "avg_pool2d"), out_layout)
        return out.squeeze(0) if self.ndim == 3 else out

    # -- bytes ------------------------------------------------------------------------------
    def serialize(self) -> bytes:
        """Framed bytes (Kind.CKKS_CIPHERTEXT, named by the SHA-256 of the public context):
        shape, layout and SEAL's ciphertexts (seeded where fresh). No pickle."""
        contiguous = np.array_equal(self.layout, contiguous_layout(self.layout.shape, self.ctx.slots))
        head = {
            "tensor": _FORMAT,
            "shape": list(self.layout.shape),
            "dtype": "float64" if self.dtype == torch.float64 else "float32",
            "layout": "contiguous" if contiguous else "explicit",
        }
        extra = b"" if contiguous else self.layout.astype("<i8").tobytes()
        return dump_ciphertexts(self.ctx.keys, self.cts, head, extra)

    @classmethod
    def load(cls, ctx: _TensorContext, data: bytes) -> EncryptedTensor:
        """Read `serialize()` bytes under `ctx`; a tensor of another context, a truncated or
        altered blob, or anything that is not an encrypted tensor is refused by name."""
        cts, head, extra = load_ciphertexts(ctx.keys, data, what="encrypted tensor")
        shape, dtype = cls._check_head(head)
        slots = ctx.slots
        numel = math.prod(shape)
        if head["layout"] == "contiguous":
            if extra:
                raise BlobFormatError("encrypted tensor: unexpected layout bytes")
            layout = contiguous_layout(shape, slots)
        else:
            if len(extra) != 8 * numel:
                raise BlobFormatError("encrypted tensor: layout size does not match its shape")
            layout = np.frombuffer(extra, dtype="<i8").astype(np.int64).reshape(shape)
        if layout.size and (layout.min() < 0 or layout.max() >= len(cts) * slots
                            or len(np.unique(layout)) != layout.size):
            raise BlobFormatError("encrypted tensor: its layout points outside its ciphertexts "
                                   "or twice at one slot")
        return cls(ctx, cts, layout, _DTYPES[dtype])

    @staticmethod
    def _check_head(head: Any) -> tuple[tuple[int, ...], str]:
        shape = head.get("shape")
        ok = (head.get("tensor") == _FORMAT and isinstance(shape, list)
              and all(isinstance(s, int) and s >= 1 for s in shape) and len(shape) <= 16
              and head.get("layout") in ("contiguous", "explicit") and head.get("dtype") in _DTYPES)
        if not ok or math.prod(shape) > _MAX_ELEMENTS:
            raise BlobFormatError("encrypted tensor: malformed header (not an encrypted tensor?)")
        return tuple(shape), head["dtype"]
