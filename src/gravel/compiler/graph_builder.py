"""Building an IR `Graph` from a framework's view of a model: what both importers share.

ONNX and torch describe tensors with their batch axis; the IR does not (its shapes are per
sample). The builder takes full-shape arguments (axes, permutations, reshape targets, pads and
broadcast constants as the framework states them), refuses those that would move or mix the
batch axis, and emits per-sample IR nodes. Shapes are checked with the IR's own rules as each
node is emitted, so an importer learns a problem at the node that causes it.

Values known at import (weights, shapes, anything not computed from the input) are `Const`s.
A shape can depend on the batch size (`x.size(0)`, ONNX `Shape`), which is symbolic: every
constant is therefore evaluated under two batch sizes, `BATCH_HYPOTHESES`; where the two
evaluations differ the value depends on the batch, and only a few uses of such a value make
sense (the batch entry of a reshape target, a constant uniform over the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gravel.compiler.ir import ACTIVATIONS, Graph, Node, node_shape
from gravel.errors import ModelError

__all__ = ["BATCH_HYPOTHESES", "Const", "GraphBuilder", "NodeProblem", "Tensor"]

# Two batch sizes under which every known value is evaluated (see the module docstring):
# small, since the torch importer runs the model at both; a value that depends on the batch
# differs between them, and only equality with the batch size in both counts as "the batch".
BATCH_HYPOTHESES = (2, 3)


class NodeProblem(ModelError):
    """One node of the source model cannot be imported; the message says why and what to do.
    Importers collect these and report every one at once."""


@dataclass(frozen=True)
class Tensor:
    """A tensor computed from the model's input: an IR node's output and its per-sample shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def full_rank(self) -> int:
        """Rank with the batch axis, as the source framework counts axes."""
        return len(self.shape) + 1


@dataclass(frozen=True)
class Const:
    """A value known at import, evaluated under each of `BATCH_HYPOTHESES`."""

    a: Any
    b: Any

    @classmethod
    def of(cls, value: Any) -> Const:
        return cls(value, value)

    @property
    def varies(self) -> bool:
        """Whether the value depends on the batch size."""
        a, b = np.asarray(self.a), np.asarray(self.b)
        return a.shape != b.shape or not np.array_equal(a, b)

    def value(self, what: str) -> np.ndarray:
        """The value as an array; refuses one that depends on the batch size."""
        if self.varies:
            raise NodeProblem(
                f"{what} depends on the batch size; Gravel needs it fixed: compute it from "
                "per-sample dimensions (x.shape[1:]) rather than from the batch axis"
            )
        return np.asarray(self.a)

    def uniform_over_batch(self, what: str) -> np.ndarray:
        """The value of a constant that may be shaped by the batch (`zeros_like(x)`) but is
        the same for every sample: its batch axis is kept with size 1."""
        if not self.varies:
            return np.asarray(self.a)
        a, b = np.asarray(self.a), np.asarray(self.b)
        b1, b2 = BATCH_HYPOTHESES
        if a.ndim and b.ndim and a.shape[0] == b1 and b.shape[0] == b2 and a.shape[1:] == b.shape[1:]:
            first = a[:1]
            if np.array_equal(np.broadcast_to(first, a.shape), a) and np.array_equal(np.broadcast_to(first, b.shape), b):
                return first
        return self.value(what)


def _floats(v: Any) -> np.ndarray:
    return np.array(v, dtype=np.float64)


def same_pads(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
              lower: bool) -> tuple[int, ...]:
    """Explicit (begin..., end...) pads for ONNX auto_pad SAME_UPPER / SAME_LOWER (and torch's
    padding='same' with stride 1, which is SAME_UPPER): the output has ceil(size / stride)
    positions, the odd extra pad goes at the end (upper) or the beginning (lower)."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(big if lower else small)
        end.append(small if lower else big)
    return tuple(begin + end)


class GraphBuilder:
    """Accumulates IR nodes in topological order, checking each one's shape as it comes."""

    def __init__(self, input_name: str, input_shape: tuple[int, ...], source: str = "",
                 batch_fixed: bool = False) -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.batch_fixed = batch_fixed  # the source declares a batch of exactly 1
        node = Node(input_name, "input", (), {}, source)
        self.nodes: list[Node] = [node]
        self._names = {input_name}
        self.input = Tensor(input_name, self.input_shape)
        self.notes: list[str] = []

    # ------------------------------------------------------------------------- bookkeeping

    def unique(self, base: str) -> str:
        base = base or "t"
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def node_of(self, t: Tensor) -> Node:
        for n in reversed(self.nodes):
            if n.name == t.name:
                return n
        raise KeyError(t.name)

    def emit(self, op: str, inputs: Sequence[Tensor], attrs: dict[str, Any], source: str,
             name: str | None = None) -> Tensor:
        """Append one IR node; its shape rule runs now, so a misfit names this node."""
        node = Node(self.unique(name or op), op, tuple(t.name for t in inputs), attrs, source)
        try:
            shape = node_shape(node, [t.shape for t in inputs], self.input_shape)
        except ModelError as exc:
            raise NodeProblem(str(exc)) from None
        self.nodes.append(node)
        return Tensor(node.name, tuple(int(d) for d in shape))

    def finish(self, output: Tensor, name: str) -> Graph:
        """The graph, pruned to what the output needs and checked."""
        graph = Graph(self.nodes, output.name, self.input_shape, name, notes=list(self.notes))
        graph.prune()
        graph.check()
        return graph

    # ---------------------------------------------------------------- axes and constants

    def axis(self, x: Tensor | int, axis: int, what: str = "axis") -> int:
        """A full-shape axis (negative allowed) as a per-sample axis; the batch axis is refused."""
        rank = x.full_rank if isinstance(x, Tensor) else x
        a = int(axis) + rank if int(axis) < 0 else int(axis)
        if not 0 <= a < rank:
            raise NodeProblem(f"{what} {axis} is out of range for a tensor of rank {rank}")
        if a == 0:
            raise NodeProblem(
                f"{what} {axis} is the batch axis; Gravel computes one sample at a time and "
                "keeps the batch axis first and untouched"
            )
        return a - 1

    def const_for(self, x: Tensor, c: Const, what: str = "constant") -> np.ndarray:
        """A constant broadcast against computed `x` (numpy / ONNX rules, aligned on the
        right), as a per-sample float array with one axis per per-sample axis of `x`.
        Refuses constants that vary over the batch axis or would grow `x`'s shape."""
        v = _floats(c.uniform_over_batch(what))
        rank = x.full_rank
        if v.ndim > rank:
            raise NodeProblem(
                f"{what} of shape {v.shape} has more axes than the computed tensor "
                f"(batch, {', '.join(map(str, x.shape))}): broadcasting would move the batch axis"
            )
        if v.ndim == rank:
            if v.shape[0] != 1:
                raise NodeProblem(
                    f"{what} of shape {v.shape} varies over the batch axis; a per-sample "
                    "constant must have size 1 there (or no batch axis at all)"
                )
            v = v[0]
        v = v.reshape((1,) * (len(x.shape) - v.ndim) + v.shape)
        try:
            grown = np.broadcast_shapes(v.shape, x.shape)
        except ValueError:
            raise NodeProblem(f"{what} of shape {v.shape} does not broadcast with {x.shape}") from None
        if tuple(grown) != x.shape:
            raise NodeProblem(
                f"{what} of shape {v.shape} would broadcast the computed tensor {x.shape} to "
                f"{tuple(grown)}; Gravel only applies constants that fit the tensor's shape"
            )
        return v

    # ------------------------------------------------------------------------ operators

    def affine(self, x: Tensor, source: str, scale: Any = None, shift: Any = None,
               name: str | None = None) -> Tensor:
        """x * scale + shift with per-sample constants (shaped by `const_for`)."""
        ones = np.ones((1,) * len(x.shape))
        scale = ones if scale is None else _floats(scale).reshape((1,) * (len(x.shape) - np.ndim(scale)) + np.shape(scale))
        shift = 0 * ones if shift is None else _floats(shift).reshape((1,) * (len(x.shape) - np.ndim(shift)) + np.shape(shift))
        if np.all(scale == 1.0) and np.all(shift == 0.0) and np.broadcast_shapes(scale.shape, shift.shape, x.shape) == x.shape:
            return x
        return self.emit("affine", [x], {"scale": scale, "shift": shift}, source, name)

    def act(self, x: Tensor, fn: str, source: str, params: dict[str, Any] | None = None,
            name: str | None = None, **extra: Any) -> Tensor:
        """A univariate activation; `extra` attributes (bits, clip) are for the quantizer."""
        if fn not in ACTIVATIONS:  # pragma: no cover - importers only name known functions
            raise NodeProblem(f"no activation {fn!r}")
        return self.emit("act", [x], {"fn": fn, "params": dict(params or {}), **extra}, source, name)

    def sign(self, x: Tensor, source: str) -> Tensor:
        """Sign with sign(0) = 0 (ONNX and torch), from the IR's sign(0) = +1:
        (sign(x) - sign(-x)) / 2 is exact everywhere; canonicalisation fuses it into one
        table lookup."""
        pos = self.act(x, "sign", source, name=f"{source}/pos")
        neg = self.act(self.affine(x, source, scale=-1.0, name=f"{source}/negx"), "sign", source, name=f"{source}/neg")
        return self.affine(self.binary("sub", pos, neg, source), source, scale=0.5)

    def binary(self, op: str, a: Tensor, b: Tensor, source: str) -> Tensor:
        """add / sub / mul of two computed tensors; both must have the same rank, so that
        broadcasting cannot pair one sample's values with another's."""
        if len(a.shape) != len(b.shape):
            raise NodeProblem(
                f"{op} of computed tensors of shapes {a.shape} and {b.shape} (per sample): "
                "different ranks would broadcast across the batch axis; reshape one first"
            )
        return self.emit(op, [a, b], {}, source)

    def arith(self, op: str, x: Tensor | Const, y: Tensor | Const, source: str) -> Tensor:
        """add / sub / mul / div with at least one computed operand: with a constant it is an
        affine map (c / x a reciprocal first); of two computed tensors add, sub or mul, and
        div only where the divisor is an elementwise function of the dividend (x / f(x),
        which canonicalisation fuses into one table lookup)."""
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if op == "div":
                if not self.univariate_of(y, x):
                    raise NodeProblem(
                        "division of two computed tensors is not supported; divide by a constant "
                        "(only x / f(x) with f elementwise, as in Softsign's x / (1 + |x|), is imported)"
                    )
                return self.binary("mul", x, self.act(y, "reciprocal", source), source)
            return self.binary(op, x, y, source)
        if isinstance(x, Tensor):
            t, c, t_first = x, y, True
        elif isinstance(y, Tensor):
            t, c, t_first = y, x, False
        else:  # pragma: no cover - importers fold constant arithmetic
            raise NodeProblem("arithmetic on constants only")
        p = self.const_for(t, c)
        if op == "add":
            return self.affine(t, source, shift=p)
        if op == "sub":
            return self.affine(t, source, shift=-p) if t_first else self.affine(t, source, scale=-1.0, shift=p)
        if op == "mul":
            return self.affine(t, source, scale=p)
        if t_first:
            if np.any(p == 0):
                raise NodeProblem("division by a constant that contains zero")
            return self.affine(t, source, scale=1.0 / p)
        return self.affine(self.act(t, "reciprocal", source), source, scale=p)

    def univariate_of(self, y: Tensor, x: Tensor) -> bool:
        """Whether `y` is computed from `x` alone through elementwise one-input nodes."""
        name = y.name
        while name != x.name:
            node = self.node_of(Tensor(name, ()))
            if node.op not in ("act", "affine"):
                return False
            name = node.inputs[0]
        return True

    def power(self, x: Tensor, exponent: float, source: str) -> Tensor:
        """x ** e for a constant e: square for 2, nothing for 1, else act pow."""
        if exponent == 1.0:
            return x
        if exponent == 2.0:
            return self.act(x, "square", source)
        return self.act(x, "pow", source, {"exponent": float(exponent)})

    def gemm(self, x: Tensor, weight: Any, bias: Any, source: str, **extra: Any) -> Tensor:
        weight = _floats(weight)
        bias = np.zeros(weight.shape[0]) if bias is None else _floats(bias).reshape(-1)
        return self.emit("gemm", [x], {"weight": weight, "bias": bias, **extra}, source)

    def matmul(self, a: Tensor | Const, b: Tensor | Const, source: str) -> Tensor:
        """numpy's matmul with one constant operand: on the last axis (x @ W), or on the
        second-to-last (W @ x, as a transposed gemm)."""
        if isinstance(a, Tensor) and isinstance(b, Const):
            w = _floats(b.value("the matrix"))
            w = self._matrix(w, a, "right")
            if w.ndim == 1:  # x @ v: a dot product on the last axis, which disappears
                y = self.gemm(a, w.reshape(1, -1), None, source)
                return self.reshape(y, a.shape[:-1], source)
            return self.gemm(a, w.T, None, source)
        if isinstance(a, Const) and isinstance(b, Tensor):
            w = _floats(a.value("the matrix"))
            w = self._matrix(w, b, "left")
            if w.ndim == 1:  # v @ x: on the second-to-last axis, which disappears
                w = w.reshape(1, -1)
                squeeze = True
            else:
                squeeze = False
            if len(b.shape) < 2:
                raise NodeProblem(f"a constant matrix times a per-sample vector {b.shape} would mix samples")
            r = len(b.shape)
            perm = tuple(range(r - 2)) + (r - 1, r - 2)
            t = self.emit("transpose", [b], {"perm": perm}, source)
            y = self.gemm(t, w, None, source)
            y = self.emit("transpose", [y], {"perm": perm}, source)
            return self.reshape(y, y.shape[:-2] + y.shape[-1:], source) if squeeze else y
        raise NodeProblem(
            "a product of two computed tensors is not a linear map; Gravel supports a matrix "
            "product with a constant (weight) operand only"
        )

    @staticmethod
    def _matrix(w: np.ndarray, x: Tensor, side: str) -> np.ndarray:
        if w.ndim > 2:
            if any(d != 1 for d in w.shape[:-2]) or w.ndim > x.full_rank:
                raise NodeProblem(
                    f"a batched matrix product with a constant of shape {w.shape} uses different "
                    "weights per slice; Gravel supports one matrix (a linear map)"
                )
            w = w.reshape(w.shape[-2:])
        k = x.shape[-1] if side == "right" else (x.shape[-2] if len(x.shape) >= 2 else -1)
        inner = w.shape[0] if side == "right" else w.shape[-1]
        if inner != k:
            raise NodeProblem(f"matrix of shape {w.shape} does not fit the computed tensor {x.shape}")
        return w

    def reshape(self, x: Tensor, shape: Sequence[int], source: str) -> Tensor:
        shape = tuple(int(d) for d in shape)
        if shape == x.shape:
            return x
        return self.emit("reshape", [x], {"shape": shape}, source)

    def reshape_full(self, x: Tensor, target: Const, source: str, allowzero: bool = False) -> Tensor:
        """A reshape to a full target shape (ONNX rules: 0 copies a dimension, -1 is
        inferred). The first entry must denote the batch: 0, -1, 1 or the batch size itself
        (as computed from the input's shape); any other target would move samples."""
        b1, b2 = BATCH_HYPOTHESES
        t1 = np.asarray(target.a, dtype=np.int64).reshape(-1)
        t2 = np.asarray(target.b, dtype=np.int64).reshape(-1)
        shown = [("batch" if u != v else int(u)) for u, v in zip(t1, t2)] if t1.shape == t2.shape else list(t1)
        if t1.shape != t2.shape or len(t1) == 0:
            raise NodeProblem(f"reshape target {shown} depends on the batch size in its length")
        varies = t1 != t2
        if varies[1:].any():
            raise NodeProblem(
                f"reshape target {shown} folds the batch size into a per-sample axis; that "
                "would move samples across the batch axis: reshape with (x.shape[0], ...)"
            )
        first = int(t1[0])
        batch_ok = (varies[0] and t1[0] == b1 and t2[0] == b2) or (
            not varies[0] and (first == -1 or first == 1 or (first == 0 and not allowzero))
        )
        if not batch_ok:
            raise NodeProblem(
                f"reshape target {shown} does not keep the batch axis first: that would move "
                "samples across it; reshape with (x.shape[0], ...) or (-1, ...) with fixed "
                "per-sample dimensions"
            )
        rest = [int(d) for d in t1[1:]]
        if first == -1 and not varies[0] and -1 in rest:
            raise NodeProblem(f"reshape target {shown} has two inferred (-1) dimensions")
        out: list[int] = []
        for i, d in enumerate(rest):
            if d == 0 and not allowzero:
                if i >= len(x.shape):
                    raise NodeProblem(f"reshape target {shown} copies dimension {i + 1}, which {x.shape} lacks")
                out.append(x.shape[i])
            elif d == 0 or d < -1:
                raise NodeProblem(f"reshape target {shown} has an empty or negative dimension")
            else:
                out.append(d)
        total = math.prod(x.shape)
        if -1 in out:
            known = math.prod(d for d in out if d != -1)
            if known == 0 or total % known:
                raise NodeProblem(f"cannot reshape {x.shape} per sample to {shown}")
            out[out.index(-1)] = total // known
        if math.prod(out) != total:
            raise NodeProblem(
                f"reshape of {x.shape} ({total} values per sample) to {shown} changes the number "
                "of values per sample, which would move values across the batch axis"
            )
        return self.reshape(x, out, source)

    def transpose_full(self, x: Tensor, perm: Sequence[int], source: str) -> Tensor:
        perm = [int(p) + x.full_rank if int(p) < 0 else int(p) for p in perm]
        if sorted(perm) != list(range(x.full_rank)):
            raise NodeProblem(f"permutation {perm} does not fit a tensor of rank {x.full_rank}")
        if perm[0] != 0:
            raise NodeProblem(
                f"permutation {perm} moves the batch axis; Gravel keeps it first: permute the "
                "per-sample axes only"
            )
        inner = tuple(p - 1 for p in perm[1:])
        if inner == tuple(range(len(inner))):
            return x
        return self.emit("transpose", [x], {"perm": inner}, source)

    def squeeze(self, x: Tensor, axes: Sequence[int] | None, source: str) -> Tensor:
        if axes is None:
            if self.batch_fixed:
                raise NodeProblem(
                    "Squeeze without axes on a model exported with a fixed batch of 1 would also "
                    "remove the batch axis; export with a symbolic batch or name the axes"
                )
            return self.reshape(x, [d for d in x.shape if d != 1], source)
        drop = {self.axis(x, a, "squeezed axis") for a in axes}
        for a in drop:
            if x.shape[a] != 1:
                raise NodeProblem(f"cannot squeeze axis {a + 1} of size {x.shape[a]}")
        return self.reshape(x, [d for i, d in enumerate(x.shape) if i not in drop], source)

    def unsqueeze(self, x: Tensor, axes: Sequence[int], source: str) -> Tensor:
        rank = x.full_rank + len(axes)
        new = sorted(self.axis(rank, a, "unsqueezed axis") for a in axes)
        shape = list(x.shape)
        for a in new:
            shape.insert(a, 1)
        return self.reshape(x, shape, source)

    def flatten_from(self, x: Tensor, start: int, end: int, source: str) -> Tensor:
        """Merge full axes start..end (inclusive, negatives allowed); start must be >= 1."""
        s = self.axis(x, start, "flatten start axis")
        e = self.axis(x, end, "flatten end axis")
        if e < s:
            return x
        shape = x.shape[:s] + (math.prod(x.shape[s : e + 1]),) + x.shape[e + 1 :]
        return self.reshape(x, shape, source)

    def concat(self, xs: Sequence[Tensor], axis: int, source: str) -> Tensor:
        if len(xs) == 1:
            return xs[0]
        a = self.axis(xs[0], axis, "concatenation axis")
        return self.emit("concat", list(xs), {"axis": a}, source)

    def pad_full(self, x: Tensor, pads: Sequence[int], value: float, source: str) -> Tensor:
        """Constant padding with full-rank (begin..., end...) pads; none on the batch axis."""
        pads = [int(p) for p in pads]
        r = x.full_rank
        if len(pads) != 2 * r:
            raise NodeProblem(f"{len(pads)} pad values for a tensor of rank {r}")
        if pads[0] or pads[r]:
            raise NodeProblem("padding the batch axis would add samples; pad per-sample axes only")
        if any(p < 0 for p in pads):
            raise NodeProblem(f"negative pads {pads} (cropping) are not supported; slice the input before export")
        inner = tuple(pads[1:r] + pads[r + 1 :])
        if not any(inner):
            return x
        return self.emit("pad", [x], {"pads": inner, "value": float(value)}, source)

    def softmax(self, x: Tensor, axis: int, source: str, log: bool = False) -> Tensor:
        """Softmax (or LogSoftmax, recorded with attrs["log"]; both keep the argmax, and a
        final one is dropped at compile time)."""
        a = self.axis(x, axis, "softmax axis")
        attrs: dict[str, Any] = {"axis": a}
        if log:
            attrs["log"] = True
            self.notes.append(
                f"LogSoftmax at '{source}' is kept as a softmax node (the IR has no log-softmax); "
                "a final one leaves the argmax unchanged"
            )
        return self.emit("softmax", [x], attrs, source)

    def global_pool(self, x: Tensor, op: str, source: str) -> Tensor:
        if len(x.shape) != 3:
            raise NodeProblem(f"global pooling needs a (C, H, W) tensor, gets {x.shape}")
        attrs: dict[str, Any] = {"kernel": (x.shape[1], x.shape[2]), "strides": (1, 1), "pads": (0, 0, 0, 0)}
        if op == "maxpool":
            attrs["dilations"] = (1, 1)
        else:
            attrs["count_include_pad"] = 0
        return self.emit(op, [x], attrs, source)

    def batch_norm(self, x: Tensor, gamma: Any, beta: Any, mean: Any, var: Any, eps: float,
                   source: str) -> Tensor:
        """Inference batch norm as an affine map with per-channel constants of shape
        (C, 1, ..., 1), channels being the first per-sample axis."""
        if not x.shape:
            raise NodeProblem("batch normalisation needs a channel axis")
        c = x.shape[0]
        gamma, beta, mean, var = (_floats(v).reshape(-1) for v in (gamma, beta, mean, var))
        if not all(len(v) == c for v in (gamma, beta, mean, var)):
            raise NodeProblem(f"batch norm parameters do not have {c} channels")
        scale = gamma / np.sqrt(var + float(eps))
        shift = beta - mean * scale
        shape = (c,) + (1,) * (len(x.shape) - 1)
        return self.emit("affine", [x], {"scale": scale.reshape(shape), "shift": shift.reshape(shape)}, source)
