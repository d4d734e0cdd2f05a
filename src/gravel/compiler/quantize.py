"""Quantize a canonical float graph into an integer program (`QGraph`), calibrating on images.

Each tensor is held as integers q with real = scale * q + offset, where scale and offset are
per-element arrays (`_Meta`). That makes constant affine operations, reshapes, transposes,
concatenations, padding and average pooling free: only the metadata changes. The consumers
absorb it: a Gemm folds per-feature scales and any offsets into its real weights and bias
before quantizing them, a Conv per-channel scales and any offsets (through an exact
per-position bias), a table lookup anything at all (a per-element table). Where a consumer
cannot absorb what it is given (a Conv after a non-uniform scale, an Add of two tensors whose
scales are not integer multiples of each other) a requantizing lookup is inserted, and said.

Weights are quantized per tensor, symmetrically (QAT bits where the model says, else
`w_bits`); activations on `a_bits` over the calibrated range (QAT clip where trained); the
accumulator before each lookup is rounded to `tlu_bits` bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any

import numpy as np

from gravel.compiler.ir import Graph, Node, evaluate, windows
from gravel.compiler.qgraph import NumpyBackend, QGraph, QNode, run_node, signed_width
from gravel.errors import ModelError
from gravel.protocol.quantization import InputQuantizer

__all__ = ["MAX_INTEGER_BITS", "QuantConfig", "conform_batch", "mixups", "quantize"]

# The widest integer concrete compiles, accumulators included: with wider ones (a 5/8/6/8 rung
# gave cnn_global_pool's final Gemm 17 bits) concrete-python 2.11 finds no parameters at all.
MAX_INTEGER_BITS = 16


@dataclass(frozen=True)
class QuantConfig:
    """Bits used where the model does not say (post-training quantization), and lookup width.

    `node_bits` overrides `a_bits` (lookups) or `w_bits` (Gemm/Conv) for named float nodes:
    what `gravel check` suggests when one layer loses accuracy."""

    # Measured on the reference 784-128-64-10 MLP (float 0.9245): 2/4/3/5 lost 1.9 points,
    # 3/5/4/5 loses 0.45 with the same TFHE parameters (same key size): lookups are 5 bits either way.
    in_bits: int = 3
    w_bits: int = 5
    a_bits: int = 4
    tlu_bits: int = 5
    clip_percentile: float = 99.99
    # "approximate" rounding is one table lookup but may be off by one step near a rounding
    # boundary; "exact" costs extra lookups. Step functions (sign, floor, ceil, round, alone or
    # inside a fused activation) jump on such errors, so their lookups round exactly ("auto").
    rounding: str = "auto"
    node_bits: tuple[tuple[str, int], ...] = ()
    # lookup width for named float nodes (the lookup computing them): the post-training search
    # widens only the lookups that lose accuracy
    node_tlu_bits: tuple[tuple[str, int], ...] = ()
    # Post-training default: try SEARCH_LADDER (cheapest first, starting from these settings)
    # and keep the first that loses at most `max_loss` of the float model's accuracy on the
    # labelled calibration samples (without labels: whose predictions differ from the float
    # model's on at most `max_disagreement` of them). Explicit bit widths (search=False) are
    # used as given. A rung must also keep the float model's predictions on at least
    # 1 - `max_mix_disagreement` of interpolated calibration samples (see `mixups`). Bias
    # correction flips fewer blends at the same widths (reference MLP's first rung: 6.8 -> 5.6 %),
    # so the limit that was 7 % without it let the corpus's Gelu (Erf) MLP keep the cheapest
    # rung at 7.0 % and lose 1.9 points on held-out digits; at 6 % every corpus model stays
    # within 1.1 points (benchmarks/corpus.py).
    search: bool = True
    max_loss: float = 0.01
    max_disagreement: float = 0.03
    max_mix_disagreement: float = 0.06
    # Bias correction (Nagel et al., "Data-Free Quantization", 2019): each Gemm/Conv's bias
    # takes back the mean error its quantized output has against the float model on the
    # calibration samples, per output channel. Rounding and clipping upstream shift a layer's
    # outputs systematically; on the corpus's global-pooling CNN (6 pooled features, 10
    # classes) that shift, not resolution, was the loss: 8 bits everywhere still lost 1.9
    # points, and taking the mean logit error back restored the float accuracy.
    bias_correction: bool = True

    def __post_init__(self) -> None:
        for key in ("in_bits", "w_bits", "a_bits"):
            if not 1 <= getattr(self, key) <= 8:
                raise ModelError(f"{key}={getattr(self, key)} is outside 1..8 bits")
        if self.rounding not in ("auto", "approximate", "exact"):
            raise ModelError(f"rounding={self.rounding!r}: choose auto, approximate or exact")
        if not 2 <= self.tlu_bits <= 16:
            raise ModelError(f"tlu_bits={self.tlu_bits} is outside 2..16 bits")
        if not 50.0 < self.clip_percentile <= 100.0:
            raise ModelError(f"clip_percentile={self.clip_percentile} is outside (50, 100]")

    def ladder(self) -> list[QuantConfig]:
        """These settings, then each rung of SEARCH_LADDER that is finer (more bits everywhere)."""
        from dataclasses import replace

        rungs = [self]
        for in_bits, w_bits, a_bits, tlu_bits in SEARCH_LADDER:
            rung = replace(self, in_bits=max(self.in_bits, in_bits), w_bits=max(self.w_bits, w_bits),
                           a_bits=max(self.a_bits, a_bits), tlu_bits=max(self.tlu_bits, tlu_bits))
            if rung != rungs[-1]:
                rungs.append(rung)
        return rungs

    def bits_for(self, node: str, default: int) -> int:
        return dict(self.node_bits).get(node, default)

    def tlu_for(self, node: str) -> int:
        return dict(self.node_tlu_bits).get(node, self.tlu_bits)


# (in_bits, w_bits, a_bits, tlu_bits) rungs of the post-training search, cheapest first. Weight
# and input bits widen accumulators only; lookup bits (tlu_bits) set the cost of every lookup.
# On the corpus of tests/compiler/corpus.py (trained, benchmarks/corpus.py) the accumulator's
# rounding to the lookup width is what loses accuracy on convolutional models: resnet_block
# kept 0.911 of 0.942 float at 4/7/4/6 and 0.922 at 5/8/5/6 (wider inputs and weights only
# widen the accumulator, so rounding removes more), but 0.933 at 4/7/5/7. A rung that wider
# is chosen for the whole model only to be narrowed again layer by layer (see
# pipeline.search_quantize): only the lookups that need the width keep it.
SEARCH_LADDER = ((4, 7, 4, 5), (4, 7, 4, 6), (4, 7, 5, 7), (5, 8, 5, 7), (5, 8, 6, 8))


def mixups(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each calibration sample blended with another (60-85 % of itself): samples near the float
    model's decision boundaries, where quantization flips predictions.

    Calibration samples usually come from the training set, on which a model is confident: on
    the corpus of tests/compiler/corpus.py the cheapest rung flipped none of 300 of them while it
    lost 2.2 points on held-out digits (unary_functions), and the reference MLP's calibration
    flips were 0 at every rung. Flips on these blends track held-out flips instead (per rung,
    benchmarks/corpus.py): 8-12 % where held-out loss was 1.4-3.9 points, 6.4 % for the
    reference MLP's rung that loses 1.05, 1-5 % on the rungs above."""
    rng = np.random.default_rng(seed)
    other = x[rng.permutation(len(x))]
    lam = rng.uniform(0.6, 0.85, size=(len(x),) + (1,) * (x.ndim - 1))
    return lam * x + (1 - lam) * other


def conform_batch(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A batch reshaped to the model's declared per-sample shape (same element count), as
    the client does for one sample; anything else is an error naming both shapes."""
    x = np.asarray(x, dtype=np.float64)
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise ModelError(f"calibration data of shape {x.shape[1:]} per sample does not fit the model's input {shape}")
    return x.reshape((len(x),) + tuple(shape))


@dataclass
class _Meta:
    scale: np.ndarray  # per element, the tensor's shape
    offset: np.ndarray

    def uniform_scale(self) -> float | None:
        s = self.scale
        return float(s.flat[0]) if s.size and np.allclose(s, s.flat[0], rtol=1e-9, atol=0) else None

    def per_channel(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, offset) per channel of a (C, ...) tensor, if constant over positions."""
        c = self.scale.shape[0]
        s = self.scale.reshape(c, -1)
        o = self.offset.reshape(c, -1)
        if np.allclose(s, s[:, :1], rtol=1e-9, atol=0) and np.allclose(o, o[:, :1], rtol=1e-9, atol=1e-12):
            return s[:, 0], o[:, 0]
        return None


def _compact(a: np.ndarray) -> Any:
    """A per-element constant as a float where it is uniform (one table), else the array."""
    a = np.asarray(a, dtype=np.float64)
    return float(a.flat[0]) if a.size and np.allclose(a, a.flat[0], rtol=1e-12, atol=0) else a


class _Quantizer:
    def __init__(self, graph: Graph, calib_x: np.ndarray, config: QuantConfig) -> None:
        if len(calib_x) == 0:
            raise ModelError("calibration needs at least one sample")
        self.g = graph
        self.cfg = config
        self.x = conform_batch(calib_x, graph.input_shape)
        self.real = evaluate(graph, self.x, keep=True)  # float activations, for ranges
        self.users = graph.consumers()
        self.nodes: list[QNode] = []
        self.meta: dict[str, _Meta] = {}  # float node name -> what its integers mean
        self.alias: dict[str, str] = {}  # float node name -> integer node holding its value
        self.ints: dict[str, np.ndarray] = {}  # integer node -> calibration values
        self.notes: list[str] = []
        self.backend = NumpyBackend()
        self.linear_of: dict[str, tuple[Node, str]] = {}  # integer node -> (float node, input)
        self.lut_keys: list[str] = []  # the names `QuantConfig.node_tlu_bits` knows each lookup by

    # -- bookkeeping ---------------------------------------------------------------------
    def _emit(self, qnode: QNode, float_name: str, meta: _Meta) -> QNode:
        qnode.shape = tuple(meta.scale.shape)
        if qnode.op == "input":
            values = self.ints[qnode.name]
        else:
            values = self.ints[qnode.name] = run_node(qnode, [self.ints[i] for i in qnode.inputs], self.backend)
        qnode.lo, qnode.hi = int(values.min()), int(values.max())
        self.nodes.append(qnode)
        self.alias[float_name] = qnode.name
        self.meta[float_name] = meta
        return qnode

    def _unique(self, name: str) -> str:
        taken = {n.name for n in self.nodes}
        base, k = name, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def _src(self, node: Node, i: int = 0) -> tuple[str, _Meta]:
        name = node.inputs[i]
        return self.alias[name], self.meta[name]

    # -- driver ---------------------------------------------------------------------------
    def run(self) -> QGraph:
        for node in self.g.nodes:
            handler = getattr(self, f"_op_{node.op}", None)
            if handler is None:
                raise ModelError(f"{node.where}: no integer form for this operator (canonicalise first)")
            handler(node)
        out = self.alias[self.g.output]
        meta = self.meta[self.g.output]
        qg = QGraph(
            nodes=self.nodes,
            output=out,
            input_shape=tuple(self.g.input_shape),
            input_quant=self.input_quant.to_json(),
            output_scale=meta.scale.reshape(-1).copy(),
            output_offset=meta.offset.reshape(-1).copy(),
            notes=list(self.g.notes) + self.notes,
        )
        return qg

    # -- operators ------------------------------------------------------------------------
    def _op_input(self, node: Node) -> None:
        bits = int(node.attrs.get("bits") or self.cfg.in_bits)
        if node.attrs.get("bits"):  # a QAT input quantizer was trained on [0, 1]
            lo, hi = 0.0, 1.0
        else:
            lo, hi = float(self.x.min()), float(self.x.max())
        iq = InputQuantizer.over_range(self.g.input_shape, bits, lo, hi)
        levels = iq.quantize_batch(self.x)
        # the levels calibration saw: a client's input is clipped to them, so it always fits the
        # integer type concrete gave the input
        self.input_quant = replace(iq, qmin=int(levels.min()), qmax=int(levels.max()))
        shape = tuple(self.g.input_shape)
        self.ints["input"] = levels
        meta = _Meta(np.full(shape, self.input_quant.step), np.full(shape, self.input_quant.lo))
        self._emit(QNode("input", "input", (), source=node.source or node.name), node.name, meta)

    def _op_affine(self, node: Node) -> None:
        src, meta = self._src(node)
        shape = self.g.shapes[node.name]
        scale = np.broadcast_to(np.asarray(node.attrs["scale"], float), shape)
        shift = np.broadcast_to(np.asarray(node.attrs["shift"], float), shape)
        self.alias[node.name] = src
        self.meta[node.name] = _Meta(meta.scale * scale, meta.offset * scale + shift)

    def _narrowed(self, node: Node, emit: Callable[[str | None], None]) -> None:
        """Emit a Gemm/Conv; where its accumulator would be wider than concrete's integers
        (MAX_INTEGER_BITS) because its input is itself an accumulator (two linear operators in
        a row, a residual sum feeding a convolution), emit it again on its input requantized to
        `a_bits` by a lookup: that costs one lookup per input element, but without it no rung of
        the search compiles and the cheapest one is kept whatever it loses."""
        emit(None)
        q = self.nodes[-1]
        width = signed_width(q.lo, q.hi)
        source = self.node(q.inputs[0])
        while source.op in ("reshape", "transpose", "pad") and source.inputs:
            source = self.node(source.inputs[0])
        if width <= MAX_INTEGER_BITS or source.op in ("lut", "input"):
            return  # already as narrow as a lookup makes it: the rung itself is too wide
        self.nodes.pop()
        self.ints.pop(q.name, None)
        self.linear_of.pop(q.name, None)
        emit(f"{node.where} would need {width}-bit accumulators (concrete's integers hold {MAX_INTEGER_BITS})")

    def _op_gemm(self, node: Node, w_scale: float | str | None = None) -> None:
        self._narrowed(node, lambda overflow: self._gemm(node, w_scale, overflow))

    def _gemm(self, node: Node, w_scale: float | str | None, overflow: str | None) -> None:
        src, meta = self._src(node)
        if overflow:
            src, meta = self._requant(node.inputs[0], overflow)
        shape = self.g.shapes[node.inputs[0]]
        s_feat = meta.scale.reshape(-1, shape[-1])
        if not np.allclose(s_feat, s_feat[:1], rtol=1e-9, atol=0):
            src, meta = self._requant(node.inputs[0], f"{node.where} needs one scale per input feature")
            s_feat = meta.scale.reshape(-1, shape[-1])
        weight = _weights(node)
        w = weight * s_feat[0][None, :]  # (out, in), real weights on the integers
        bias = meta.offset @ weight.T + node.attrs["bias"]  # (..., out)
        self._linear(node, src, "gemm", w, bias, w_scale, {})

    def _op_conv(self, node: Node, w_scale: float | str | None = None) -> None:
        self._narrowed(node, lambda overflow: self._conv(node, w_scale, overflow))

    def _conv(self, node: Node, w_scale: float | str | None, overflow: str | None) -> None:
        src, meta = self._src(node)
        if overflow:
            src, meta = self._requant(node.inputs[0], overflow)
        pc = meta.per_channel()
        if pc is None or np.any(pc[0] <= 0):
            src, meta = self._requant(node.inputs[0], f"{node.where} needs one positive scale per input channel")
            pc = meta.per_channel()
        s_c = pc[0]
        w = _weights(node)
        g = int(node.attrs.get("group", 1))
        o, cg = w.shape[:2]
        w_real = (w.reshape(g, o // g, cg, *w.shape[2:]) * s_c.reshape(g, 1, cg, 1, 1)).reshape(w.shape)
        # offsets, zero-padded exactly like the integers, through the float convolution
        from gravel.compiler.ir import conv2d

        probe = Node("probe", "conv", ("x",), dict(node.attrs, weight=w, bias=np.zeros(o)))
        bias = conv2d(meta.offset[None], probe)[0] + _full_bias(node.attrs["bias"], self.g.shapes[node.name])
        self._linear(node, src, "conv", w_real, bias, w_scale, {"group": g})

    def _linear(self, node: Node, src: str, kind: str, w: np.ndarray, bias: np.ndarray,
                w_scale: float | str | None, extra: dict[str, Any]) -> None:
        bits = self.cfg.bits_for(node.name, int(node.attrs.get("w_bits") or self.cfg.w_bits))
        qmax = max(1, 2 ** (bits - 1) - 1)
        out_shape = self.g.shapes[node.name]
        if w_scale is None or w_scale == "tensor":
            # a QAT layer (w_bits in the model) was trained with one scale per tensor: keep it
            per_tensor = w_scale == "tensor" or bits == 1 or node.attrs.get("w_bits") is not None
            w_scale = _weight_scale(w, qmax, per_tensor)
        per_out = np.broadcast_to(np.asarray(w_scale, dtype=np.float64), (w.shape[0],))
        w_int = np.round(w / per_out.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int64)
        channel = per_out if kind == "gemm" else per_out.reshape(-1, 1, 1)
        b_int = np.round(np.asarray(bias) / channel).astype(np.int64)
        attrs: dict[str, Any] = {"kind": kind, "w_bits": bits}
        if kind == "gemm":
            attrs["weight"] = np.ascontiguousarray(w_int.T)
            per_channel = b_int.reshape(-1, out_shape[-1])
            attrs["bias"] = per_channel[0].copy() if (per_channel == per_channel[:1]).all() else b_int
        else:
            a = node.attrs
            attrs.update(
                in_shape=tuple(self.g.shapes[node.inputs[0]]),
                kernel=tuple(w.shape[2:]),
                strides=tuple(a.get("strides", (1, 1))),
                pads=tuple(a.get("pads", (0, 0, 0, 0))),
                dilations=tuple(a.get("dilations", (1, 1))),
                group=extra["group"],
                weight=_conv_matrix(w_int, extra["group"]),
            )
            per_pos = b_int.reshape(b_int.shape[0], -1)
            attrs["bias"] = (
                per_pos[:, 0].reshape(-1, 1, 1).copy() if (per_pos == per_pos[:, :1]).all() else b_int
            )
        name = self._unique(node.name)
        q = QNode(name, "linear", (src,), attrs, node.source or node.name)
        q.attrs["w_scale"] = _compact(per_out)
        if name in self.ints:
            del self.ints[name]
        scale = np.broadcast_to(channel, out_shape).copy()
        self._emit(q, node.name, _Meta(scale, np.zeros(out_shape)))
        self.linear_of[name] = (node, src)
        if self.cfg.bias_correction and node.attrs.get("w_bits") is None:
            self._correct_bias(q, node.name, kind, channel)

    def _correct_bias(self, q: QNode, float_name: str, kind: str, channel: np.ndarray) -> None:
        """Move the bias by the mean error of the quantized output against the float model's on
        the calibration samples, per output channel, in accumulator steps (see
        `QuantConfig.bias_correction`). A QAT layer (trained with its quantizers) is left alone:
        its float graph already is what the integers compute."""
        ints = self.ints[q.name]
        real = np.asarray(self.real[float_name], dtype=np.float64).reshape(ints.shape)
        axes = (0, 2, 3) if kind == "conv" else tuple(range(ints.ndim - 1))  # all but the channel's
        steps = np.round((ints * channel - real).mean(axis=axes) / channel.reshape(-1)).astype(np.int64)
        if steps.any():
            q.attrs["bias"] = np.asarray(q.attrs["bias"]) - steps.reshape(channel.shape)
            self._rerun(q)

    def _op_act(self, node: Node) -> None:
        src, meta = self._src(node)
        a = node.attrs
        fn, params = a["fn"], dict(a.get("params") or {})
        y = self.real[node.name]
        if a.get("bits") and fn == "relu":  # QAT: trained bits and clip
            bits = int(a["bits"])
            clip = float(a["clip"]) if a.get("clip") is not None else float(np.percentile(y, self.cfg.clip_percentile))
            out = (clip / (2**bits - 1), 0.0, 0, 2**bits - 1)
        elif fn == "sign":
            out = (2.0, -1.0, 0, 1)  # bit b stands for 2b - 1
        else:
            bits = self.cfg.bits_for(node.name, int(a.get("bits") or self.cfg.a_bits))
            p = self.cfg.clip_percentile
            lo = min(float(np.percentile(y, 100.0 - p)), 0.0)
            hi = max(float(np.percentile(y, p)), 0.0)
            step = (hi - lo) / (2**bits - 1) if hi > lo else 1.0
            lo = -round(-lo / step) * step  # zero on the grid: exact zeros stay exact
            out = (step, lo, 0, 2**bits - 1)
        if fn == "sign":
            src, meta = self._sign_threshold(node, src, meta)
        self._lut(node.name, node.source or node.name, src, meta, fn, params, out, exact_hint=_has_steps(fn, params))

    def _sign_threshold(self, node: Node, src: str, meta: _Meta) -> tuple[str, _Meta]:
        """sign(s * a + o) as an exact integer threshold in the producing Gemm/Conv: channels
        with s < 0 are negated, -T is added to the bias (T = the smallest a with a positive
        sign), and, where the accumulator is rounded to 2^l steps, h = 2^(l-1) more, taken back
        in the lookup: round(a' + h) >= 2h exactly when a' >= 0. Binarized layers stay exact."""
        q = self.node(src)
        if q.op != "linear" or len(self.users[node.inputs[0]]) != 1:
            return src, meta
        shape = meta.scale.shape
        axis = 0 if q.attrs["kind"] == "conv" else len(shape) - 1
        pc = _Meta(np.moveaxis(meta.scale, axis, 0), np.moveaxis(meta.offset, axis, 0)).per_channel()
        if pc is None:
            return src, meta
        s, o = pc
        flip = s < 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(flip, np.ceil(o / np.where(s == 0, 1, s)), np.ceil(-o / np.where(s == 0, 1, s)))
        t = np.where(s == 0, np.where(o >= 0, -(2**20), 2**20), t).astype(np.int64)  # constant signs
        sign = np.where(flip, -1, 1)
        w = q.attrs["weight"]
        if q.attrs["kind"] == "gemm":
            q.attrs["weight"] = np.ascontiguousarray(w * sign[None, :])
        else:
            q.attrs["weight"] = np.ascontiguousarray(w * sign[None, :])
        bias = np.asarray(q.attrs["bias"])
        shape_b = (-1,) + (1,) * (bias.ndim - 1) if axis == 0 else (-1,)
        q.attrs["bias"] = bias * sign.reshape(shape_b) - t.reshape(shape_b)
        self._rerun(q)
        lsbs = max(0, signed_width(q.lo, q.hi) - self.cfg.tlu_for(node.name))
        h = 2 ** (lsbs - 1) if lsbs else 0
        if h:
            q.attrs["bias"] = q.attrs["bias"] + h
            self._rerun(q)
        ones = np.ones(shape)
        return src, _Meta(ones, -2.0 * h * ones)

    def _rerun(self, q: QNode) -> None:
        """Recompute a node's calibration values after its constants changed."""
        values = self.ints[q.name] = run_node(q, [self.ints[i] for i in q.inputs], self.backend)
        q.lo, q.hi = int(values.min()), int(values.max())

    def _lut(self, name: str, source: str, src: str, meta: _Meta, fn: str, params: dict[str, Any],
             out: tuple[float, float, int, int], exact_hint: bool = False) -> QNode:
        s_out, o_out, qmin, qmax = out
        lo, hi = self.node(src).lo, self.node(src).hi
        width = signed_width(lo, hi)
        lsbs = max(0, width - self.cfg.tlu_for(name))
        exact = self.cfg.rounding == "exact" or (self.cfg.rounding == "auto" and exact_hint)
        attrs = {
            "fn": fn, "params": params, "in_scale": _compact(meta.scale), "in_offset": _compact(meta.offset),
            "out_scale": float(s_out), "out_offset": float(o_out), "qmin": int(qmin), "qmax": int(qmax),
            "lsbs": lsbs, "exact": exact, "acc_bits": width,
        }
        shape = meta.scale.shape
        self.lut_keys.append(name)
        q = QNode(self._unique(name), "lut", (src,), attrs, source)
        self._emit(q, name, _Meta(np.full(shape, float(s_out)), np.full(shape, float(o_out))))
        # concrete sizes every integer from the calibration set and wraps what falls outside:
        # clipping each table to the outputs calibration produced keeps lookups in bounds
        q.attrs["qmin"], q.attrs["qmax"] = q.lo, q.hi
        return q

    def node(self, qname: str) -> QNode:
        for n in reversed(self.nodes):
            if n.name == qname:
                return n
        raise KeyError(qname)

    def _requant(self, float_name: str, why: str, scale: float | None = None, offset: float | None = None,
                 signed: bool = False) -> tuple[str, _Meta]:
        """Insert an identity lookup that puts `float_name` on one uniform scale (and offset)."""
        src, meta = self.alias[float_name], self.meta[float_name]
        real = self.real[float_name]
        bits = max(self.cfg.a_bits, 4)
        if scale is None:
            if signed:
                m = float(np.abs(real).max()) or 1.0
                qmax = 2 ** (bits - 1) - 1
                out = (m / qmax, 0.0, -qmax - 1, qmax)
            else:
                lo, hi = float(real.min()), float(real.max())
                step = (hi - lo) / (2**bits - 1) if hi > lo else 1.0
                out = (step, lo, 0, 2**bits - 1)
        else:
            o = 0.0 if offset is None else offset
            span = (float(real.max()) - o) / scale
            low = (float(real.min()) - o) / scale
            out = (scale, o, int(np.floor(low)) - 1, int(np.ceil(span)) + 1)
        self.notes.append(f"{why}: inserted a requantizing table lookup after '{float_name}'")
        q = self._lut(f"{float_name}_requant", float_name, src, meta, "identity", {}, out)
        return q.name, self.meta[f"{float_name}_requant"]

    def _op_add(self, node: Node) -> None:
        self._join(node, sign=1)

    def _op_sub(self, node: Node) -> None:
        self._join(node, sign=-1)

    def _join(self, node: Node, sign: int) -> None:
        """ma * a + mb * b on one scale: integer multipliers, else re-quantize a linear input
        to a scale that makes them integers, else a requantizing lookup."""
        shape = self.g.shapes[node.name]
        names = list(node.inputs)
        srcs = [self.alias[n] for n in names]
        metas = [self.meta[n] for n in names]
        if any(m.scale.shape != shape for m in metas):  # broadcasting joins
            for k, n in enumerate(names):
                if metas[k].scale.shape != shape:
                    raise ModelError(f"{node.where}: broadcasting {metas[k].scale.shape} to {shape} in an "
                                     "addition of two computed tensors is not supported")
        scales = [m.uniform_scale() for m in metas]
        for k in range(2):
            producer = self.g.node(names[k])
            if scales[k] is None and producer.op in ("gemm", "conv") and len(self.users[names[k]]) == 1:
                # per-channel weights: one scale for the whole tensor is what an addition needs
                self.nodes.remove(self.node(srcs[k]))
                getattr(self, f"_op_{producer.op}")(producer, w_scale="tensor")
                srcs[k], metas[k] = self.alias[names[k]], self.meta[names[k]]
                scales[k] = metas[k].uniform_scale()
            if scales[k] is None:
                srcs[k], metas[k] = self._requant(names[k], f"{node.where} adds tensors of one scale each")
                scales[k] = metas[k].uniform_scale()
        sa, sb = scales
        mult = _integer_ratio(sa, sb)
        if mult is None:
            # a Gemm/Conv read by this join alone can take the scale that makes the ratio an integer
            for k in (1, 0):
                other = 1 - k
                producer = self.g.node(names[k])
                if producer.op in ("gemm", "conv") and len(self.users[names[k]]) == 1:
                    fnode, _ = self.linear_of[srcs[k]]
                    natural = scales[k]
                    m = max(1, round(scales[other] / natural))
                    self.nodes.remove(self.node(srcs[k]))
                    getattr(self, f"_op_{fnode.op}")(fnode, w_scale=scales[other] / m)
                    srcs[k], metas[k] = self.alias[names[k]], self.meta[names[k]]
                    scales[k] = metas[k].uniform_scale()
                    break
            sa, sb = scales
            mult = _integer_ratio(sa, sb)
        if mult is None:
            srcs[1], metas[1] = self._requant(names[1], f"{node.where} adds tensors of unrelated scales", scale=sa)
            sb = metas[1].uniform_scale()
            mult = _integer_ratio(sa, sb)
        ma, mb, s_out = mult
        q = QNode(self._unique(node.name), "add", tuple(srcs), {"ma": ma, "mb": sign * mb}, node.source or node.name)
        offset = metas[0].offset + sign * metas[1].offset
        self._emit(q, node.name, _Meta(np.full(shape, s_out), offset))

    def _op_mul(self, node: Node) -> None:
        srcs, metas = [], []
        for k, n in enumerate(node.inputs):
            src, meta = self.alias[n], self.meta[n]
            q = self.node(src)
            # concrete multiplies two ciphertexts with lookups on their sum's width: keep both narrow
            narrow = signed_width(q.lo, q.hi) <= self.cfg.a_bits + 1
            if not np.allclose(meta.offset, 0) or not narrow:
                src, meta = self._requant(n, f"{node.where} multiplies narrow tensors without offsets", signed=True)
            srcs.append(src)
            metas.append(meta)
        shape = self.g.shapes[node.name]
        if any(m.scale.shape != shape for m in metas):
            raise ModelError(f"{node.where}: broadcasting in a product of two computed tensors is not supported")
        qa, qb = self.node(srcs[0]), self.node(srcs[1])
        attrs = {}
        if (qa.lo < 0) != (qb.lo < 0):  # one signed, one unsigned: see run_node's "mul"
            attrs["shift_b" if qb.lo >= 0 else "shift_a"] = (qb.hi if qb.lo >= 0 else qa.hi) + 1
        q = QNode(self._unique(node.name), "mul", tuple(srcs), attrs, node.source or node.name)
        self._emit(q, node.name, _Meta(metas[0].scale * metas[1].scale, np.zeros(shape)))

    def _window_attrs(self, node: Node) -> dict[str, Any]:
        from gravel.compiler.ir import _pair

        a = node.attrs
        return {
            "in_shape": tuple(self.g.shapes[node.inputs[0]]),
            "kernel": _pair(a["kernel"]),
            "strides": _pair(a.get("strides", 1)),
            "pads": tuple(a.get("pads", (0, 0, 0, 0))),
            "dilations": _pair(a.get("dilations", 1)),
        }

    def _op_maxpool(self, node: Node) -> None:
        src, meta = self._src(node)
        pc = meta.per_channel()
        if pc is None or np.any(pc[0] <= 0):
            src, meta = self._requant(node.inputs[0], f"{node.where} needs one positive scale per channel")
            pc = meta.per_channel()
        attrs = self._window_attrs(node)
        kh, kw = attrs["kernel"]
        attrs.update(window=kh * kw, pad=self.node(src).lo)
        shape = self.g.shapes[node.name]
        q = QNode(self._unique(node.name), "maxpool", (src,), attrs, node.source or node.name)
        ones = np.ones(shape)
        self._emit(q, node.name, _Meta(pc[0].reshape(-1, 1, 1) * ones, pc[1].reshape(-1, 1, 1) * ones))

    def _op_avgpool(self, node: Node) -> None:
        src, meta = self._src(node)
        pc = meta.per_channel()
        if pc is None:
            src, meta = self._requant(node.inputs[0], f"{node.where} needs one scale per channel")
            pc = meta.per_channel()
        attrs = self._window_attrs(node)
        shape = self.g.shapes[node.name]
        in_shape = attrs["in_shape"]
        ones = np.ones((1, 1) + tuple(in_shape[1:]))
        if node.attrs.get("count_include_pad", 0):
            count = windows(ones, node, pad_value=1.0, overhang_value=0.0).sum(axis=2)[0, 0]
        else:
            count = windows(ones, node).sum(axis=2)[0, 0]
        offset_sum = windows(meta.offset[None], node).sum(axis=2)[0]
        q = QNode(self._unique(node.name), "sumpool", (src,), attrs, node.source or node.name)
        self._emit(q, node.name, _Meta(pc[0].reshape(-1, 1, 1) / count[None], offset_sum / count[None]))

    def _op_reshape(self, node: Node) -> None:
        src, meta = self._src(node)
        shape = tuple(self.g.shapes[node.name])
        q = QNode(self._unique(node.name), "reshape", (src,), {"shape": shape}, node.source or node.name)
        self._emit(q, node.name, _Meta(meta.scale.reshape(shape), meta.offset.reshape(shape)))

    def _op_transpose(self, node: Node) -> None:
        src, meta = self._src(node)
        perm = tuple(node.attrs["perm"])
        q = QNode(self._unique(node.name), "transpose", (src,), {"perm": perm}, node.source or node.name)
        self._emit(q, node.name, _Meta(np.transpose(meta.scale, perm), np.transpose(meta.offset, perm)))

    def _op_concat(self, node: Node) -> None:
        axis = int(node.attrs["axis"])
        srcs = tuple(self.alias[n] for n in node.inputs)
        metas = [self.meta[n] for n in node.inputs]
        q = QNode(self._unique(node.name), "concat", srcs, {"axis": axis}, node.source or node.name)
        self._emit(q, node.name, _Meta(np.concatenate([m.scale for m in metas], axis),
                                        np.concatenate([m.offset for m in metas], axis)))

    def _op_pad(self, node: Node) -> None:
        src, meta = self._src(node)
        pads = tuple(int(p) for p in node.attrs["pads"])
        value = float(node.attrs.get("value", 0.0))
        in_shape = tuple(self.g.shapes[node.inputs[0]])
        half = len(in_shape)
        width = [(pads[i], pads[i + half]) for i in range(half)]
        s = meta.uniform_scale()
        o = float(meta.offset.flat[0]) if np.allclose(meta.offset, meta.offset.flat[0]) else None
        q_pad = None
        if s is not None and o is not None:
            level = (value - o) / s
            if abs(level - round(level)) < 1e-9:
                q_pad = int(round(level))  # padding on the grid: the metadata stays uniform
        if q_pad is not None:
            scale = np.pad(meta.scale, width, mode="edge")
            offset = np.pad(meta.offset, width, mode="edge")
        else:  # integer 0 in the padding, which then stands for `value`
            q_pad = 0
            scale = np.pad(meta.scale, width, mode="edge")
            offset = np.pad(meta.offset, width, constant_values=value)
        attrs = {"in_shape": in_shape, "pads": pads, "value": q_pad}
        q = QNode(self._unique(node.name), "pad", (src,), attrs, node.source or node.name)
        self._emit(q, node.name, _Meta(scale, offset))

    def _op_softmax(self, node: Node) -> None:
        raise ModelError(f"{node.where}: a Softmax inside the network cannot be compiled (only a final one)")


# Weights are quantized per tensor (one lookup table serves every channel, so the stage can be
# sharded) unless output channels' largest weights differ by more than this factor (batch norm
# folded into a depthwise convolution, typically): then per channel, each channel filling its
# bits, and the lookup after it takes one table per channel.
PER_CHANNEL_RATIO = 4.0


# Functions that jump: an accumulator rounded one step off (approximate rounding) moves their
# output by a whole step, not a little, so their lookups round exactly under "auto".
_STEP_FUNCTIONS = frozenset({"sign", "floor", "ceil", "round"})


def _has_steps(fn: str, params: dict[str, Any]) -> bool:
    if fn == "composite":
        return any(step.get("fn") in _STEP_FUNCTIONS for step in params.get("steps", ()))
    return fn in _STEP_FUNCTIONS


def _weight_scale(w: np.ndarray, qmax: int, per_tensor: bool) -> float | np.ndarray:
    per_out = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    top = max(float(per_out.max()), 1e-12)
    if per_tensor or per_out.min() * PER_CHANNEL_RATIO >= top:
        return top / qmax
    return np.maximum(per_out, top * 1e-6) / qmax


def _weights(node: Node) -> np.ndarray:
    """A Gemm/Conv's real weights; QAT binarized layers (w_bits 1) compute with their signs."""
    w = np.asarray(node.attrs["weight"], dtype=np.float64)
    return np.where(w >= 0, 1.0, -1.0) if node.attrs.get("w_bits") == 1 else w


def _full_bias(bias: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    b = np.asarray(bias, dtype=np.float64)
    if b.ndim == 1 and len(shape) == 3:
        b = b.reshape(-1, 1, 1)
    return np.broadcast_to(b, shape)


def _conv_matrix(w_int: np.ndarray, group: int) -> np.ndarray:
    """(O, C/g, kh, kw) integer kernels as the (C*kh*kw, O) matrix the im2col gather feeds
    (block diagonal across groups)."""
    o, cg, kh, kw = w_int.shape
    k = kh * kw
    c = cg * group
    full = np.zeros((c, k, o), dtype=np.int64)
    per = o // group
    for g in range(group):
        block = w_int[g * per : (g + 1) * per].reshape(per, cg, k)  # (o', c', k)
        full[g * cg : (g + 1) * cg, :, g * per : (g + 1) * per] = np.transpose(block, (1, 2, 0))
    return np.ascontiguousarray(full.reshape(c * k, o))


def _integer_ratio(sa: float, sb: float) -> tuple[int, int, float] | None:
    """(ma, mb, s) with sa = ma * s and sb = mb * s for small integers, else None."""
    for big, small, flip in ((sa, sb, False), (sb, sa, True)):
        r = big / small
        if abs(r - round(r)) <= 1e-6 * r and round(r) <= 2**12:
            m = int(round(r))
            return (1, m, sa) if flip else (m, 1, sb)
    return None


def quantize(graph: Graph, calib_x: np.ndarray, config: QuantConfig = QuantConfig()) -> QGraph:
    """The integer program of a canonical float graph, calibrated on `calib_x` (N, ...)."""
    return _Quantizer(graph, calib_x, config).run()
