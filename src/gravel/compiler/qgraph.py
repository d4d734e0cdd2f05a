"""The integer program: what a quantized model computes, in integers, node by node.

Every tensor between nodes is an integer tensor; `QGraph.meta` says what real value each
integer stands for (real = scale * q + offset, per element). Only `lut` nodes (and the
pairwise maxima of `maxpool`) are table lookups, the one costly operation in TFHE; every other
node is exact integer arithmetic on ciphertexts with clear constants.

    input      the client's quantized input (see gravel.protocol.quantization)
    linear     gemm (weight (fan_in, out) on the last axis) or conv (im2col gather, then a
               (C*kh*kw, O) matrix); integer weight and bias (per channel, or per position)
    lut        y = clip(round((f(s_in * round_lsbs(a) + o_in) - o_out) / s_out), qmin, qmax)
    add        ma * a + mb * b with integer multipliers (sub is mb < 0)
    mul        a * b
    maxpool    window maximum by pairwise b + relu(a - b) lookups; padding never wins
    sumpool    window sum (average pooling's integer part; the division lives in `meta`)
    reshape, transpose, concat, pad      data movement

The same `run_node` evaluates a node on numpy batches (the clear reference) and under
concrete's tracer (the FHE program): the backend object is the only difference, so the two
cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from gravel.compiler.ir import activation

__all__ = [
    "NumpyBackend",
    "QGraph",
    "QNode",
    "TraceBackend",
    "lut_function",
    "run_node",
    "signed_width",
]


def signed_width(lo: int, hi: int) -> int:
    """Bits of a signed integer holding every value in [lo, hi]."""
    magnitude = max(int(hi) + 1, -int(lo), 1)
    return int(math.ceil(math.log2(magnitude))) + 1


@dataclass
class QNode:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    shape: tuple[int, ...] = ()  # per-sample output shape
    lo: int = 0  # output range seen on the calibration set
    hi: int = 0

    @property
    def where(self) -> str:
        return f"node '{self.source or self.name}' ({self.op})"

    @property
    def lookups(self) -> int:
        """Table lookups this node costs per inference."""
        if self.op == "lut":
            return math.prod(self.shape)
        if self.op == "maxpool":
            return math.prod(self.shape) * (self.attrs["window"] - 1)
        return 0


@dataclass
class QGraph:
    """A quantized model: integer nodes in topological order, the first being the input."""

    nodes: list[QNode]
    output: str
    input_shape: tuple[int, ...]
    input_quant: dict[str, Any]  # gravel.protocol.quantization.InputQuantizer.to_json()
    output_scale: np.ndarray  # logits = q * output_scale + output_offset (flattened)
    output_offset: np.ndarray
    meta: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> QNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def lookups(self) -> int:
        return sum(n.lookups for n in self.nodes)

    def forward_int(self, q: np.ndarray, keep: bool = False) -> Any:
        """Clear reference on a batch of quantized inputs (exact rounding of accumulators)."""
        backend = NumpyBackend()
        values: dict[str, Any] = {}
        for node in self.nodes:
            values[node.name] = q if node.op == "input" else run_node(node, [values[i] for i in node.inputs], backend)
        return values if keep else values[self.output]

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        from gravel.protocol.quantization import InputQuantizer

        return InputQuantizer.from_json(self.input_quant).quantize_batch(x)

    def dequantize_output(self, q: np.ndarray) -> np.ndarray:
        return q.reshape(len(q), -1) * self.output_scale + self.output_offset

    def predict(self, x: np.ndarray, batch: int = 1000) -> np.ndarray:
        out = [self.forward_int(self.quantize_input(x[i : i + batch])) for i in range(0, len(x), batch)]
        return self.dequantize_output(np.concatenate(out)).argmax(1)


# ------------------------------------------------------------------------------ lookups


def lut_function(attrs: dict[str, Any]) -> Callable[[Any], Any]:
    """The univariate integer function of a `lut` node, traceable by concrete: float
    operations on one encrypted value with constant (possibly per-element) parameters fuse
    into one table lookup per element."""
    f = activation(attrs["fn"], attrs.get("params"))
    s_in, o_in = np.asarray(attrs["in_scale"]), np.asarray(attrs["in_offset"])
    s_out, o_out = float(attrs["out_scale"]), float(attrs["out_offset"])
    qmin, qmax = int(attrs["qmin"]), int(attrs["qmax"])

    def fn(a: Any) -> Any:
        y = f(a * s_in + o_in)
        return np.clip(np.floor((y - o_out) / s_out + 0.5), qmin, qmax).astype(np.int64)

    fn.attrs = attrs  # type: ignore[attr-defined]  (what a training backend derives its gradient from)
    return fn


# ------------------------------------------------------------------------------ backends


class NumpyBackend:
    """Integer node operations on a numpy batch (leading axis = samples)."""

    lead = 1

    def round(self, a: Any, lsbs: int, exact: bool = True) -> Any:
        if lsbs == 0:
            return a
        return np.floor((a + 2 ** (lsbs - 1)) / 2**lsbs).astype(np.int64) * 2**lsbs

    def lut(self, fn: Callable[[Any], Any], a: Any) -> Any:
        return fn(a)

    def maximum(self, a: Any, b: Any) -> Any:
        return np.maximum(a, b)

    def concat(self, parts: Sequence[Any], axis: int) -> Any:
        return parts[0] if len(parts) == 1 else np.concatenate(tuple(parts), axis=axis + self.lead)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return np.transpose(x, perm)

    def sum(self, x: Any, axis: int) -> Any:
        return np.sum(x, axis=axis)

    def zeros_like_tail(self, x: Any, n: int) -> Any:
        return np.zeros(x.shape[:-1] + (n,), dtype=np.int64)


class TraceBackend(NumpyBackend):
    """The same operations on one sample under concrete's tracer."""

    lead = 0

    def round(self, a: Any, lsbs: int, exact: bool = False) -> Any:
        # Accumulator bounds come from the inputset: fhe.hint(bit_width=...) on the
        # accumulator gave wrong results with concrete-python 2.11.
        from concrete import fhe

        if lsbs == 0:
            return a
        exactness = fhe.Exactness.EXACT if exact else fhe.Exactness.APPROXIMATE
        return fhe.round_bit_pattern(a, lsbs_to_remove=lsbs, exactness=exactness)

    def lut(self, fn: Callable[[Any], Any], a: Any) -> Any:
        # concrete tabulates fn (any numpy/scipy code); per-element constants in fn give one
        # table per element, still one lookup each
        from concrete import fhe

        return fhe.univariate(fn)(a)

    def maximum(self, a: Any, b: Any) -> Any:
        from concrete import fhe

        return b + fhe.univariate(lambda d: np.maximum(d, 0))(a - b)

    def zeros_like_tail(self, x: Any, n: int) -> Any:
        from concrete import fhe

        return fhe.zeros((n,))


# ------------------------------------------------------------------------------ node semantics


@lru_cache(maxsize=256)
def window_index(
    in_shape: tuple[int, int, int], kernel: tuple[int, int], strides: tuple[int, int],
    pads: tuple[int, int, int, int], dilations: tuple[int, int], out_hw: tuple[int, int],
) -> np.ndarray:
    """Indices into the flattened (C, H, W) input of every window, shaped (C, k, Ho*Wo);
    positions in the padding point at the pad slot C*H*W."""
    c, h, w = in_shape
    kh, kw = kernel
    sh, sw = strides
    t, l = pads[0], pads[1]
    dh, dw = dilations
    ho, wo = out_hw
    pad_slot = c * h * w
    rows = (np.arange(ho) * sh - t)[:, None] + (np.arange(kh) * dh)[None, :]  # (Ho, kh)
    cols = (np.arange(wo) * sw - l)[:, None] + (np.arange(kw) * dw)[None, :]  # (Wo, kw)
    r = rows[:, None, :, None]  # (Ho, 1, kh, 1)
    s = cols[None, :, None, :]  # (1, Wo, 1, kw)
    inside = (r >= 0) & (r < h) & (s >= 0) & (s < w)
    flat = np.where(inside, r * w + s, -1)  # (Ho, Wo, kh, kw)
    flat = flat.transpose(2, 3, 0, 1).reshape(kh * kw, ho * wo)  # (k, P)
    chan = np.arange(c)[:, None, None] * h * w
    index = np.where(flat[None] >= 0, chan + flat[None], pad_slot)  # (C, k, P)
    return index.astype(np.int64)


def _with_pad_slot(x: Any, backend: Any, value: int) -> Any:
    """x flattened per sample, with one more slot holding `value` (what padding reads)."""
    lead = backend.lead
    flat = x.reshape(x.shape[:lead] + (-1,)) if lead else x.reshape((-1,))
    pad = backend.zeros_like_tail(flat, 1)
    if value:
        pad = pad + int(value)
    return backend.concat((flat, pad), 0)


def _take(flat: Any, index: np.ndarray, backend: Any) -> Any:
    """flat[..., index]: concrete's tracer takes a plain index array, not an Ellipsis."""
    return flat[:, index] if backend.lead else flat[index]


def _windows(node: QNode, x: Any, backend: Any, in_shape: tuple[int, ...], pad_value: int) -> Any:
    """(..., C, k, P) window values of x; positions in the padding read `pad_value`."""
    a = node.attrs
    index = window_index(tuple(in_shape), tuple(a["kernel"]), tuple(a["strides"]), tuple(a["pads"]),
                         tuple(a["dilations"]), tuple(node.shape[1:]))
    return _take(_with_pad_slot(x, backend, pad_value), index, backend)


def run_node(node: QNode, args: list[Any], backend: Any, w: Any = None, b: Any = None) -> Any:
    """Evaluate one integer node. For `linear`, `w` and `b` (one shard's weight columns and
    bias, constants of that shard's function) replace the node's own weights when given."""
    op, a, lead = node.op, node.attrs, backend.lead
    x = args[0] if args else None
    if op == "linear":
        w = a["weight"] if w is None else w
        b = a["bias"] if b is None else b
        if a["kind"] == "gemm":
            return x @ w + b
        in_shape = a["in_shape"]
        cols = _windows(node, x, backend, in_shape, 0)  # (..., C, k, P)
        c, k, p = in_shape[0], cols.shape[-2], cols.shape[-1]
        # (..., P, C*k) @ (C*k, O) -> (..., P, O) -> (..., O, Ho, Wo)
        if lead:
            cols = backend.transpose(cols, (0, 3, 1, 2)).reshape(cols.shape[0], p, c * k)
            acc = cols @ w
            acc = backend.transpose(acc, (0, 2, 1)).reshape((acc.shape[0], acc.shape[2]) + tuple(node.shape[1:]))
        else:
            cols = backend.transpose(cols, (2, 0, 1)).reshape((p, c * k))
            acc = cols @ w
            acc = backend.transpose(acc, (1, 0)).reshape((acc.shape[1],) + tuple(node.shape[1:]))
        return acc + b
    if op == "lut":
        return backend.lut(lut_function(a), backend.round(x, a["lsbs"], a["exact"]))
    if op == "add":
        return x * a["ma"] + args[1] * a["mb"] if a["ma"] != 1 or a["mb"] != 1 else x + args[1]
    if op == "mul":
        # concrete-python 2.11 multiplies a signed by an unsigned ciphertext wrongly (checked:
        # simulation and execution): the unsigned operand is moved below zero by k and k times
        # the other added back, a * u = a * (u - k) + k * a, exact in integers
        y, ka, kb = args[1], int(a.get("shift_a", 0)), int(a.get("shift_b", 0))
        if kb:
            return x * (y - kb) + x * kb
        if ka:
            return (x - ka) * y + y * ka
        return x * y
    if op in ("maxpool", "sumpool"):
        cols = _windows(node, x, backend, a["in_shape"], a.get("pad", 0))  # (..., C, k, P)
        k = cols.shape[-2]
        if op == "sumpool":
            out = backend.sum(cols, -2)
        else:
            parts = [cols[:, :, i, :] if lead else cols[:, i, :] for i in range(k)]
            while len(parts) > 1:  # a balanced tree of pairwise maxima
                nxt = [backend.maximum(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
                if len(parts) % 2:
                    nxt.append(parts[-1])
                parts = nxt
            out = parts[0]
        return out.reshape(out.shape[:lead] + tuple(node.shape))
    if op == "reshape":
        return x.reshape(x.shape[:lead] + tuple(node.shape))
    if op == "transpose":
        perm = tuple(range(lead)) + tuple(p + lead for p in a["perm"])
        return backend.transpose(x, perm)
    if op == "concat":
        return backend.concat(args, a["axis"])
    if op == "pad":
        return _pad(node, x, backend)
    raise ValueError(f"{node.where}: unknown integer operator")  # pragma: no cover


def _pad(node: QNode, x: Any, backend: Any) -> Any:
    """Constant padding as a gather from the flattened input plus one pad slot."""
    index = _pad_index(tuple(node.attrs["in_shape"]), tuple(node.attrs["pads"]))
    return _take(_with_pad_slot(x, backend, int(node.attrs.get("value", 0))), index, backend)


@lru_cache(maxsize=64)
def _pad_index(in_shape: tuple[int, ...], pads: tuple[int, ...]) -> np.ndarray:
    half = len(in_shape)
    src = np.arange(math.prod(in_shape)).reshape(in_shape)
    width = [(pads[i], pads[i + half]) for i in range(half)]
    return np.pad(src, width, constant_values=math.prod(in_shape)).astype(np.int64)
