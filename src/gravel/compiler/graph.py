"""The integer graph: what a quantized model computes, stage by stage, in integers.

A stage is: prefix ops without parameters (flatten, sum pooling) on the full input, then one
linear op (matmul or convolution as im2col + matmul) with integer weights and bias, then,
except in the output stage, one table lookup that fuses ReLU or sign, the batch-norm threshold
and the requantization to the next stage's bits, applied to the accumulator after its
`lsbs` low bits are rounded away. One table lookup per neuron, on few bits, is what keeps the
TFHE program fast.

The same `stage_forward` runs on numpy batches (the clear reference) and on concrete's tracer
(the FHE program): the `Backend` object is the only difference, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Activation",
    "IntGraph",
    "NumpyBackend",
    "Stage",
    "activation_fn",
    "conv_gather_index",
    "stage_forward",
]


@dataclass(frozen=True)
class Activation:
    """`requant`: y = clip(floor(acc * scale + 0.5), 0, 2^bits - 1), i.e. ReLU + requantize.
    `sign`: y = 1 if acc >= 0 else 0 (the bit of a {-1, +1} activation)."""

    kind: str
    scale: float = 1.0
    bits: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "bits": self.bits}


def activation_fn(act: Activation) -> Callable[[Any], Any]:
    """The univariate function of an activation, traceable by concrete (float ops fuse into a TLU)."""
    if act.kind == "sign":
        return lambda a: (a >= 0).astype(np.int64)
    qmax = 2**act.bits - 1
    scale = act.scale
    return lambda a: np.clip(np.floor(a * scale + 0.5), 0, qmax).astype(np.int64)


@dataclass
class Stage:
    name: str
    source: str  # the layer of the original model this stage came from
    kind: str  # "linear" or "conv"
    in_shape: tuple[int, ...]  # the stage's input, before prefix ops
    prefix: list[tuple]  # ("flatten",) or ("sumpool", kernel, stride)
    weight: np.ndarray  # int64; linear: (in, out); conv: (O, C, kh, kw)
    bias: np.ndarray  # int64, (out,)
    stride: int = 1
    padding: int = 0
    act: Activation | None = None
    lsbs: int = 0  # low bits of the accumulator rounded away before the table lookup
    acc_range: tuple[int, int] = (0, 0)  # accumulator range seen on calibration data
    acc_bits: int = 0  # signed width of the calibrated accumulator range
    exact_rounding: bool = False  # approximate rounding may be off by one step; exact is not

    @property
    def out_channels(self) -> int:
        return int(self.bias.shape[0])

    def prefix_shape(self) -> tuple[int, ...]:
        shape = self.in_shape
        for op in self.prefix:
            if op[0] == "flatten":
                shape = (math.prod(shape),)
            else:
                _, k, s = op
                c, h, w = shape
                shape = (c, (h - k) // s + 1, (w - k) // s + 1)
        return shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_channels,)
        _, h, w = self.prefix_shape()
        kh = self.weight.shape[2]
        ho = (h + 2 * self.padding - kh) // self.stride + 1
        wo = (w + 2 * self.padding - self.weight.shape[3]) // self.stride + 1
        return (self.out_channels, ho, wo)

    @property
    def positions(self) -> int:
        """Output positions per channel: table lookups per output channel."""
        return math.prod(self.out_shape[1:]) if self.kind == "conv" else 1

    @property
    def pbs_count(self) -> int:
        return 0 if self.act is None else self.out_channels * self.positions

    def weight_matrix(self) -> np.ndarray:
        """The weights as a (fan_in, out) matrix: conv kernels flattened in im2col order."""
        if self.kind == "linear":
            return self.weight
        return self.weight.reshape(self.out_channels, -1).T


@dataclass
class IntGraph:
    """A quantized model as integer stages plus the client's input/output conversions."""

    input_shape: tuple[int, ...]
    input_bits: int
    stages: list[Stage]
    output_scale: np.ndarray  # logits = acc * output_scale + output_offset, per class
    output_offset: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        levels = 2**self.input_bits - 1
        return np.floor(np.clip(x, 0.0, 1.0) * levels + 0.5).astype(np.int64)

    def dequantize_output(self, acc: np.ndarray) -> np.ndarray:
        return acc * self.output_scale + self.output_offset

    def forward_int(self, x_int: np.ndarray, upto: int | None = None) -> np.ndarray:
        """Clear reference on a batch of quantized inputs; exact rounding of accumulators."""
        h = x_int
        backend = NumpyBackend()
        for stage in self.stages[:upto]:
            h = stage_forward(stage, [h], stage.weight_matrix(), stage.bias, backend)
        return h

    def predict(self, x: np.ndarray, batch: int = 2000) -> np.ndarray:
        out = [self.forward_int(self.quantize_input(x[i : i + batch])) for i in range(0, len(x), batch)]
        return self.dequantize_output(np.concatenate(out)).argmax(1)


class NumpyBackend:
    """Stage operations on a numpy batch (leading axis = samples)."""

    batched = True

    def concat(self, parts: Sequence[Any]) -> Any:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def flatten(self, x: Any) -> Any:
        return x.reshape(x.shape[0], -1)

    def gather(self, flat: Any, index: np.ndarray) -> Any:
        return flat[:, index]

    def pad_zero(self, flat: Any) -> Any:
        return np.concatenate([flat, np.zeros((flat.shape[0], 1), dtype=flat.dtype)], axis=1)

    def round(self, a: Any, lsbs: int, exact: bool = True) -> Any:
        if lsbs == 0:
            return a
        return np.floor((a + 2 ** (lsbs - 1)) / 2**lsbs).astype(np.int64) * 2**lsbs

    def lut(self, fn: Callable[[Any], Any], a: Any) -> Any:
        return fn(a)

    def to_channels_first(self, a: Any, shape: tuple[int, ...]) -> Any:
        # (N, P, n) -> (N, n, Ho, Wo)
        return np.transpose(a, (0, 2, 1)).reshape((a.shape[0], a.shape[2]) + shape)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape((x.shape[0],) + shape)


def conv_gather_index(
    in_shape: tuple[int, int, int], kernel: tuple[int, int], stride: int, padding: int
) -> tuple[np.ndarray, bool]:
    """im2col indices into the flattened (C, H, W) input; the padding slot is index C*H*W.

    Returns (index of shape (positions, C*kh*kw), whether the padding slot is used).
    """
    c, h, w = in_shape
    kh, kw = kernel
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    pad_slot = c * h * w
    index = np.full((ho * wo, c * kh * kw), pad_slot, dtype=np.int64)
    for i in range(ho):
        for j in range(wo):
            k = 0
            for ch in range(c):
                for di in range(kh):
                    for dj in range(kw):
                        r, s = i * stride - padding + di, j * stride - padding + dj
                        if 0 <= r < h and 0 <= s < w:
                            index[i * wo + j, k] = ch * h * w + r * w + s
                        k += 1
    return index, bool((index == pad_slot).any())


def _sumpool_index(in_shape: tuple[int, int, int], k: int, s: int) -> np.ndarray:
    c, h, w = in_shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    index = np.empty((c * ho * wo, k * k), dtype=np.int64)
    for ch in range(c):
        for i in range(ho):
            for j in range(wo):
                row = (ch * ho + i) * wo + j
                index[row] = [ch * h * w + (i * s + di) * w + (j * s + dj) for di in range(k) for dj in range(k)]
    return index


def apply_prefix(stage: Stage, x: Any, backend: Any) -> Any:
    shape = stage.in_shape
    for op in stage.prefix:
        if op[0] == "flatten":
            x = backend.flatten(x)
            shape = (math.prod(shape),)
        else:
            _, k, s = op
            index = _sumpool_index(shape, k, s)
            pooled = np.sum(backend.gather(backend.flatten(x), index), axis=-1)
            c, h, w = shape
            shape = (c, (h - k) // s + 1, (w - k) // s + 1)
            x = backend.reshape(pooled, shape)
    return x


def stage_forward(stage: Stage, parts: Sequence[Any], w: Any, b: Any, backend: Any) -> Any:
    """One stage (or one shard of it, given that shard's weight columns `w` and bias `b`).

    `parts` are the previous stage's shard outputs; they are concatenated along channels.
    """
    x = apply_prefix(stage, backend.concat(parts), backend)
    if stage.kind == "linear":
        acc = x @ w + b
    else:
        _, kh, kw = stage.weight.shape[1:]
        index, padded = conv_gather_index(stage.prefix_shape(), (kh, kw), stage.stride, stage.padding)
        flat = backend.flatten(x)
        if padded:
            flat = backend.pad_zero(flat)
        acc = backend.gather(flat, index) @ w + b
        acc = backend.to_channels_first(acc, stage.out_shape[1:])
    if stage.act is None:
        return acc
    return backend.lut(activation_fn(stage.act), backend.round(acc, stage.lsbs, stage.exact_rounding))
