"""A model as a chain of float operators: the common ground of PyTorch and ONNX imports.

Importers turn what they read into these; `quantize` turns these into an IntGraph. `bits` and
`clip` are set where the model was trained with quantization (QAT) and None where the
compiler must choose them from calibration data (post-training quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ActOp",
    "BatchNormOp",
    "ConvOp",
    "FlattenOp",
    "FloatOp",
    "InputQuantOp",
    "LinearOp",
    "PoolOp",
    "float_forward",
]


@dataclass
class InputQuantOp:
    bits: int
    source: str = "input"


@dataclass
class LinearOp:
    weight: np.ndarray  # (out, in)
    bias: np.ndarray  # (out,)
    w_bits: int | None
    source: str


@dataclass
class ConvOp:
    weight: np.ndarray  # (O, C, kh, kw)
    bias: np.ndarray  # (O,)
    stride: int
    padding: int
    w_bits: int | None
    source: str


@dataclass
class BatchNormOp:
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    source: str

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        scale = self.gamma / np.sqrt(self.var + self.eps)
        return scale, self.beta - self.mean * scale


@dataclass
class ActOp:
    kind: str  # "relu" or "sign"
    bits: int | None
    clip: float | None
    source: str


@dataclass
class PoolOp:
    kernel: int
    stride: int
    source: str


@dataclass
class FlattenOp:
    source: str


FloatOp = InputQuantOp | LinearOp | ConvOp | BatchNormOp | ActOp | PoolOp | FlattenOp


def _conv(x: np.ndarray, op: ConvOp) -> np.ndarray:
    n, c, h, w = x.shape
    o, _, kh, kw = op.weight.shape
    p, s = op.padding, op.stride
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i : i + s * ho : s, j : j + s * wo : s]
    out = np.einsum("nckluv,ockl->nouv", cols, op.weight)
    return out + op.bias[None, :, None, None]


def float_forward(ops: list[FloatOp], x: np.ndarray, quantize_input: bool = True) -> np.ndarray:
    """The model in float arithmetic (numpy), for accuracy comparisons; QAT activations clip
    at their trained bound but are not rounded."""
    h = x.astype(np.float64)
    for op in ops:
        if isinstance(op, InputQuantOp):
            if quantize_input:
                levels = 2**op.bits - 1
                h = np.floor(np.clip(h, 0, 1) * levels + 0.5) / levels
        elif isinstance(op, LinearOp):
            w = np.where(op.weight >= 0, 1.0, -1.0) if op.w_bits == 1 else op.weight
            h = h @ w.T + op.bias
        elif isinstance(op, ConvOp):
            w = np.where(op.weight >= 0, 1.0, -1.0) if op.w_bits == 1 else op.weight
            h = _conv(h, ConvOp(w, op.bias, op.stride, op.padding, None, op.source))
        elif isinstance(op, BatchNormOp):
            scale, shift = op.scale_shift()
            shape = (1, -1) + (1,) * (h.ndim - 2)
            h = h * scale.reshape(shape) + shift.reshape(shape)
        elif isinstance(op, ActOp):
            if op.kind == "sign":
                h = np.where(h >= 0, 1.0, -1.0)
            else:
                h = np.maximum(h, 0) if op.clip is None else np.clip(h, 0, op.clip)
        elif isinstance(op, PoolOp):
            n, c, hh, ww = h.shape
            k, s = op.kernel, op.stride
            ho, wo = (hh - k) // s + 1, (ww - k) // s + 1
            acc = np.zeros((n, c, ho, wo))
            for i in range(k):
                for j in range(k):
                    acc += h[:, :, i : i + s * ho : s, j : j + s * wo : s]
            h = acc / (k * k)
        elif isinstance(op, FlattenOp):
            h = h.reshape(h.shape[0], -1)
    return h
