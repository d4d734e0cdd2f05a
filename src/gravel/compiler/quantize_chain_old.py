"""Float operators -> integer graph, by QAT parameters where trained, calibration elsewhere.

Each tensor between stages is held as integers with `real = scale * int + offset`. Weights are
quantized per tensor, symmetrically (so that a layer's shards share one lookup table); batch
norm is folded into the weights, or, before a sign activation, into an exact integer
threshold. Accumulator ranges are measured on calibration images, and the low bits beyond
`tlu_bits` are rounded away before each table lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gravel.compiler.graph import Activation, IntGraph, NumpyBackend, Stage, stage_forward
from gravel.compiler.ops import (
    ActOp,
    BatchNormOp,
    ConvOp,
    FlattenOp,
    FloatOp,
    InputQuantOp,
    LinearOp,
    PoolOp,
)
from gravel.errors import ModelError

__all__ = ["QuantConfig", "quantize", "signed_width"]


@dataclass(frozen=True)
class QuantConfig:
    """Bits used where the model does not say (post-training quantization), and TLU width."""

    in_bits: int = 2
    w_bits: int = 4
    a_bits: int = 3
    tlu_bits: int = 5
    clip_percentile: float = 99.99
    # "approximate" rounding is one table lookup but may be off by one step near a rounding
    # boundary; "exact" costs extra lookups. Sign activations flip on such errors, so
    # binarized layers default to exact rounding ("auto").
    rounding: str = "auto"

    def __post_init__(self) -> None:
        for key in ("in_bits", "w_bits", "a_bits"):
            if not 1 <= getattr(self, key) <= 8:
                raise ModelError(f"{key}={getattr(self, key)} is outside 1..8 bits")
        if self.rounding not in ("auto", "approximate", "exact"):
            raise ModelError(f"rounding={self.rounding!r}: choose auto, approximate or exact")
        if not 2 <= self.tlu_bits <= 16:
            raise ModelError(f"tlu_bits={self.tlu_bits} is outside 2..16 bits")


def signed_width(lo: int, hi: int) -> int:
    """Bits of a signed integer holding every value in [lo, hi]."""
    magnitude = max(int(hi) + 1, -int(lo), 1)
    return int(math.ceil(math.log2(magnitude))) + 1


def _quantize_weight(w: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    if bits == 1:
        return np.where(w >= 0, 1, -1).astype(np.int64), 1.0
    qmax = 2 ** (bits - 1) - 1
    scale = max(float(np.abs(w).max()), 1e-12) / qmax
    return np.round(w / scale).astype(np.int64), scale


def _fan_sum(w_int: np.ndarray, kind: str) -> np.ndarray:
    """Per output channel, the sum of its integer weights (to carry an input offset)."""
    return w_int.sum(axis=1) if kind == "linear" else w_int.reshape(w_int.shape[0], -1).sum(axis=1)


def quantize(ops: list[FloatOp], calib_x: np.ndarray, config: QuantConfig = QuantConfig()) -> IntGraph:
    """Quantize a chain of float operators; `calib_x` are float images in [0, 1], (N, C, H, W)."""
    if len(calib_x) == 0:
        raise ModelError("calibration needs at least one image")
    ops = list(ops)
    in_bits = config.in_bits
    if ops and isinstance(ops[0], InputQuantOp):
        in_bits = ops.pop(0).bits
    if any(isinstance(op, InputQuantOp) for op in ops):
        raise ModelError("an input quantizer may only stand first in the model")
    input_shape = tuple(calib_x.shape[1:])
    levels = 2**in_bits - 1
    h = np.floor(np.clip(calib_x, 0, 1) * levels + 0.5).astype(np.int64)
    scale, offset = 1.0 / levels, 0.0
    shape: tuple[int, ...] = input_shape
    stage_in_shape = shape
    stage_in_quant = (scale, offset)
    prefix: list[tuple] = []
    stages: list[Stage] = []
    meta: list[dict] = []
    start = 0  # index into `ops` where the current stage's operators begin
    out_scale = out_offset = None
    i = 0
    backend = NumpyBackend()
    while i < len(ops):
        op = ops[i]
        if isinstance(op, FlattenOp):
            prefix.append(("flatten",))
            shape = (math.prod(shape),)
            i += 1
            continue
        if isinstance(op, PoolOp):
            if len(shape) != 3:
                raise ModelError(f"layer '{op.source}': average pooling needs a (C, H, W) input, got {shape}")
            prefix.append(("sumpool", op.kernel, op.stride))
            c, hh, ww = shape
            shape = (c, (hh - op.kernel) // op.stride + 1, (ww - op.kernel) // op.stride + 1)
            scale /= op.kernel * op.kernel
            i += 1
            continue
        if not isinstance(op, (LinearOp, ConvOp)):
            raise ModelError(
                f"layer '{op.source}': {type(op).__name__.removesuffix('Op')} must follow a Linear or Conv2d layer"
            )
        kind = "linear" if isinstance(op, LinearOp) else "conv"
        if kind == "linear" and len(shape) != 1:
            raise ModelError(f"layer '{op.source}': Linear needs a flat input, got shape {shape}; add Flatten")
        if kind == "conv" and len(shape) != 3:
            raise ModelError(f"layer '{op.source}': Conv2d needs a (C, H, W) input, got shape {shape}")
        fan_in = op.weight.shape[1]  # Linear (out, in) and Conv2d (O, C, kh, kw) alike
        expected = shape[0]
        if fan_in != expected:
            raise ModelError(f"layer '{op.source}': expects {fan_in} input features/channels, gets {expected}")
        bn = ops[i + 1] if i + 1 < len(ops) and isinstance(ops[i + 1], BatchNormOp) else None
        j = i + 1 + (bn is not None)
        act = ops[j] if j < len(ops) and isinstance(ops[j], ActOp) else None
        end = j + (act is not None)
        binary = op.w_bits == 1
        if kind == "conv" and op.padding and offset != 0:
            raise ModelError(
                f"layer '{op.source}': zero padding after a {{-1, +1}} activation cannot be represented; "
                "use padding=0 in binarized convolutions"
            )
        w_real, b_real = op.weight.astype(np.float64), op.bias.astype(np.float64)
        if bn is not None and not binary and act is not None and act.kind == "relu":
            bn_scale, bn_shift = bn.scale_shift()
            w_real = w_real * bn_scale.reshape((-1,) + (1,) * (w_real.ndim - 1))
            b_real = b_real * bn_scale + bn_shift
            bn = None
        w_int, w_scale = _quantize_weight(w_real, 1 if binary else (op.w_bits or config.w_bits))
        acc_scale = scale * w_scale
        fan = _fan_sum(w_int, kind) * w_scale  # real weight sums, to carry the input offset
        activation: Activation | None = None
        sign_bias: np.ndarray | None = None
        if act is not None and act.kind == "sign":
            if bn is None:
                bn_scale, bn_shift = np.ones(len(b_real)), np.zeros(len(b_real))
            else:
                bn_scale, bn_shift = bn.scale_shift()
            # sign(bn_scale * (acc_real + b) + bn_shift), acc_real = scale * acc_int + offset * fan
            safe = np.where(bn_scale == 0, 1e-12, bn_scale)
            t = (offset * fan + b_real + bn_shift / safe) / acc_scale
            flip = bn_scale < 0
            w_int = np.where(flip.reshape((-1,) + (1,) * (w_int.ndim - 1)), -w_int, w_int)
            sign_bias = np.where(flip, -(np.floor(t) + 1), -np.ceil(-t)).astype(np.int64)
            activation = Activation("sign", 1.0, 1)
            bn = None
        if bn is not None:
            if act is not None:
                raise ModelError(f"layer '{bn.source}': batch norm before {act.kind} cannot be folded here")
            bn_scale, bn_shift = bn.scale_shift()
            b_int = np.zeros(len(b_real), dtype=np.int64)
            out_scale = bn_scale * acc_scale
            out_offset = bn_scale * (offset * fan + b_real) + bn_shift
        elif sign_bias is not None:
            b_int = sign_bias
        else:
            b_int = np.round((b_real + offset * fan) / acc_scale).astype(np.int64)
        weight = w_int.T.copy() if kind == "linear" else w_int
        stage = Stage(
            name=f"stage{len(stages)}",
            source=op.source,
            kind=kind,
            in_shape=stage_in_shape,
            prefix=prefix,
            weight=np.ascontiguousarray(weight, dtype=np.int64),
            bias=np.ascontiguousarray(b_int, dtype=np.int64),
            stride=getattr(op, "stride", 1),
            padding=getattr(op, "padding", 0),
        )
        acc = stage_forward(stage, [h], stage.weight_matrix(), stage.bias, backend)
        stage.acc_range = (int(acc.min()), int(acc.max()))
        if act is not None:
            if activation is None:
                bits = act.bits or config.a_bits
                clip = act.clip
                if clip is None:
                    positive = acc[acc > 0] * acc_scale
                    clip = float(np.percentile(positive, config.clip_percentile)) if positive.size else 1.0
                new_scale = clip / (2**bits - 1)
                activation = Activation("requant", acc_scale / new_scale, bits)
                scale, offset = new_scale, 0.0
            else:
                scale, offset = 2.0, -1.0  # bit b stands for 2b - 1
            stage.act = activation
            # concrete measures the same bounds on the same calibration images, so rounding
            # away `lsbs` keeps exactly `tlu_bits` bits for the lookup
            stage.acc_bits = signed_width(*stage.acc_range)
            stage.lsbs = max(0, stage.acc_bits - config.tlu_bits)
            stage.exact_rounding = config.rounding == "exact" or (
                config.rounding == "auto" and activation.kind == "sign"
            )
            if activation.kind == "sign" and stage.lsbs:
                # round-half-up moves the threshold by half a step; shift it back
                stage.bias = stage.bias - 2 ** (stage.lsbs - 1)
            h = stage_forward(stage, [h], stage.weight_matrix(), stage.bias, backend)
        else:
            if end < len(ops):
                raise ModelError(f"layer '{op.source}': a linear layer without activation must be the last")
            if out_scale is None:
                out_scale = np.full(stage.out_channels, acc_scale)
                out_offset = np.zeros(stage.out_channels)
            h = acc
        meta.append({"ops": [start, end], "in_quant": list(stage_in_quant), "out_quant": [scale, offset]})
        stages.append(stage)
        prefix = []
        shape = stage.out_shape
        stage_in_shape, stage_in_quant = shape, (scale, offset)
        start = end
        i = end
    if not stages:
        raise ModelError("the model has no Linear or Conv2d layer")
    last = stages[-1]
    if last.act is not None:
        out_scale = np.full(last.out_channels, scale)
        out_offset = np.full(last.out_channels, offset)
    if len(last.out_shape) != 1:
        raise ModelError(f"the model's output must be a vector of class scores, got shape {last.out_shape}")
    graph = IntGraph(input_shape, in_bits, stages, np.asarray(out_scale, float), np.asarray(out_offset, float))
    graph.meta["stages"] = meta
    return graph
