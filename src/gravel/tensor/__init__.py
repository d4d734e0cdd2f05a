"""Encrypted tensors you compute with like torch tensors (CKKS, on Microsoft SEAL via TenSEAL).

    import gravel.tensor as gt
    ctx = gt.Context(depth=4)             # the secret key stays in ctx; ctx.public() has none
    x = ctx.encrypt(torch.randn(8, 16))   # any shape
    y = (x * 2 + x) @ W + b               # plain or encrypted operands, broadcasting
    y.sum(dim=1); y.polyval([0.5, 0.197, 0, -0.004]); gt.conv2d(img, kernel)
    y.decrypt()                           # a torch.Tensor

`gt.nn.from_pytorch(model, sample)` makes an encrypted-callable module; `gravel.tensor.train`
trains logistic and linear regression on encrypted data. Depth costs of each operation are
listed in gravel.tensor.tensor.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from gravel.errors import DepthError, InputError, KeyMismatchError
from gravel.tensor import approx
from gravel.tensor.context import Context, PublicContext
from gravel.tensor.functional import (
    avg_pool2d,
    conv2d,
    dot,
    matmul,
    mean,
    polyval,
    relu,
    sigmoid,
    sum,
    tanh,
)
from gravel.tensor.tensor import EncryptedTensor

__all__ = [
    "Context",
    "DepthError",
    "EncryptedTensor",
    "InputError",
    "KeyMismatchError",
    "PublicContext",
    "approx",
    "avg_pool2d",
    "conv2d",
    "dot",
    "matmul",
    "mean",
    "nn",
    "polyval",
    "relu",
    "sigmoid",
    "sum",
    "tanh",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in ("nn", "train"):
        return import_module(f"gravel.tensor.{name}")
    raise AttributeError(f"module 'gravel.tensor' has no attribute {name!r}")
