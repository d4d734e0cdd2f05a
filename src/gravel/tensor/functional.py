"""torch.nn.functional-style functions on encrypted tensors (the methods, as functions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gravel.errors import InputError
from gravel.tensor.tensor import EncryptedTensor

__all__ = [
    "avg_pool2d",
    "conv2d",
    "dot",
    "matmul",
    "mean",
    "polyval",
    "relu",
    "sigmoid",
    "sum",
    "tanh",
]


def _enc(x: Any, op: str) -> EncryptedTensor:
    if not isinstance(x, EncryptedTensor):
        raise InputError(f"{op} takes an EncryptedTensor first (got {type(x).__name__}); "
                         "encrypt it with ctx.encrypt(...)")
    return x


def conv2d(x: EncryptedTensor, kernel: Any, bias: Any = None, stride: int = 1,
           padding: int = 0) -> EncryptedTensor:
    """torch.nn.functional.conv2d with a plain kernel (Co, C, kh, kw): one level."""
    return _enc(x, "conv2d").conv2d(kernel, bias, stride, padding)


def avg_pool2d(x: EncryptedTensor, kernel_size: int, stride: int | None = None) -> EncryptedTensor:
    """torch.nn.functional.avg_pool2d (no padding): one level."""
    return _enc(x, "avg_pool2d").avg_pool2d(kernel_size, stride)


def polyval(x: EncryptedTensor, coeffs: Sequence[float]) -> EncryptedTensor:
    """sum_i coeffs[i] * x^i element-wise (constant term first): ceil(log2(degree+1)) levels."""
    return _enc(x, "polyval").polyval(coeffs)


def sigmoid(x: EncryptedTensor, low: float = -8.0, high: float = 8.0, degree: int = 3) -> EncryptedTensor:
    """Polynomial sigmoid, valid on [low, high] (see gravel.tensor.approx.sigmoid)."""
    return _enc(x, "sigmoid").sigmoid(low, high, degree)


def tanh(x: EncryptedTensor, low: float = -4.0, high: float = 4.0, degree: int = 5) -> EncryptedTensor:
    """Polynomial tanh, valid on [low, high]."""
    return _enc(x, "tanh").tanh(low, high, degree)


def relu(x: EncryptedTensor, low: float = -4.0, high: float = 4.0, degree: int = 4) -> EncryptedTensor:
    """Polynomial ReLU, valid on [low, high] (least accurate near 0)."""
    return _enc(x, "relu").relu(low, high, degree)


def matmul(a: Any, b: Any) -> EncryptedTensor:
    """a @ b with either (or both) encrypted."""
    if not isinstance(a, EncryptedTensor) and not isinstance(b, EncryptedTensor):
        raise InputError("matmul: neither operand is encrypted")
    return a @ b


def dot(a: EncryptedTensor, b: Any) -> EncryptedTensor:
    return _enc(a, "dot").dot(b)


def sum(x: EncryptedTensor, dim: Any = None, keepdim: bool = False) -> EncryptedTensor:
    return _enc(x, "sum").sum(dim, keepdim)


def mean(x: EncryptedTensor, dim: Any = None, keepdim: bool = False) -> EncryptedTensor:
    return _enc(x, "mean").mean(dim, keepdim)
