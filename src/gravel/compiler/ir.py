"""The compiler's internal form: a graph (DAG) of typed float operators.

Importers (ONNX, torch) produce a `Graph`; the passes in `gravel.compiler.passes` rewrite it
(canonicalise, quantize, partition) and the lowering turns it into a backend program. Every
node's semantics is defined once here, in `evaluate`, on numpy batches: the importers' tests,
calibration and accuracy checks all run this one reference.

Shapes are per sample: the batch axis is never part of a node's shape, and ops that would mix
samples (a transpose or reshape across the batch axis) are refused at import.

Operators (`Node.op`) and their attributes:

    input      -                                       the model's single input
    gemm       weight (out, in), bias (out,)           y = x @ weight.T + bias on the last axis
    conv       weight (O, C/group, kh, kw), bias (O,), strides (2), pads (top, left, bottom,
               right), dilations (2), group            2-D convolution, zero padding
    affine     scale, shift (broadcast to the shape)   y = x * scale + shift (constants)
    act        fn, params                              a univariate function (see ACTIVATIONS)
    add, sub, mul                                      two computed tensors, with broadcasting
    maxpool    kernel, strides, pads, dilations        padding never wins the max
    avgpool    kernel, strides, pads, count_include_pad
    reshape    shape (per sample)                      Flatten, Squeeze and Unsqueeze too
    transpose  perm (per-sample axes)
    concat     axis (per-sample axis)
    pad        pads (begin..., end...), value          constant padding
    softmax    axis                                    kept only to be dropped when final
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gravel.errors import ModelError

__all__ = [
    "ACTIVATIONS",
    "OPS",
    "Graph",
    "Node",
    "activation",
    "evaluate",
    "infer_shapes",
    "node_shape",
]

OPS = (
    "input", "gemm", "conv", "affine", "act", "add", "sub", "mul", "maxpool", "avgpool",
    "reshape", "transpose", "concat", "pad", "softmax",
)


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _selu(x: np.ndarray, alpha: float = 1.6732632423543772, gamma: float = 1.0507009873554805) -> np.ndarray:
    return gamma * np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))


# Univariate activations: name -> f(x, **params). Every one is a single table lookup in TFHE.
ACTIVATIONS: dict[str, Callable[..., np.ndarray]] = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": lambda x, alpha=0.01: np.where(x >= 0, x, alpha * x),
    "prelu": lambda x, slope=0.25: np.where(x >= 0, x, np.asarray(slope) * x),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "hard_sigmoid": lambda x, alpha=0.2, beta=0.5: np.clip(alpha * x + beta, 0.0, 1.0),
    "hard_swish": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "elu": lambda x, alpha=1.0: np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1)),
    "selu": _selu,
    "celu": lambda x, alpha=1.0: np.maximum(x, 0) + np.minimum(0, alpha * (np.exp(np.minimum(x, 0) / alpha) - 1)),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "silu": lambda x: x * _sigmoid(x),
    "mish": lambda x: x * np.tanh(np.logaddexp(0.0, x)),
    "clip": lambda x, min=-np.inf, max=np.inf: np.clip(x, min, max),  # noqa: A002 - ONNX names
    "sign": lambda x: np.where(x >= 0, 1.0, -1.0),
    "abs": np.abs,
    "neg": np.negative,
    "square": np.square,
    "pow": lambda x, exponent=2.0: np.power(x, exponent),
    "erf": _erf,
    "exp": lambda x: np.exp(np.minimum(x, 80.0)),
    "sqrt": lambda x: np.sqrt(np.maximum(x, 0.0)),
    "reciprocal": lambda x: 1.0 / np.where(x == 0, 1e-12, x),
    "floor": np.floor,
    "ceil": np.ceil,
    "round": np.round,
    # Elementwise steps fused by `fuse_univariate`: params["steps"] is a list of
    # {"fn": name, "params": {...}, "args": [i]}, {"fn": "affine", "scale": s, "shift": t,
    # "args": [i]} or {"fn": "add" | "sub" | "mul", "args": [i, j]}; value 0 is x, step k
    # makes value k + 1, and the last step's value is the result.
    "composite": lambda x, steps=(): _composite(x, steps),
}


def _composite(x: np.ndarray, steps: Iterable[dict[str, Any]]) -> np.ndarray:
    values = [x]
    for step in steps:
        args = [values[i] for i in step.get("args", [len(values) - 1])]
        fn = step["fn"]
        if fn == "affine":
            v = args[0] * np.asarray(step["scale"]) + np.asarray(step["shift"])
        elif fn == "add":
            v = args[0] + args[1]
        elif fn == "sub":
            v = args[0] - args[1]
        elif fn == "mul":
            v = args[0] * args[1]
        else:
            v = activation(fn, step.get("params", {}))(args[0])
        values.append(v)
    return values[-1]


def activation(fn: str, params: dict[str, Any] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The numpy function of a named activation with its parameters bound."""
    if fn not in ACTIVATIONS:
        raise ModelError(f"unknown activation {fn!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    f, kw = ACTIVATIONS[fn], dict(params or {})
    return lambda x: f(x, **kw)


@dataclass
class Node:
    """One operator. `name` also names the tensor it produces; `source` is where it came from
    in the original model (ONNX node name, torch module path), for error messages."""

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ModelError(f"node '{self.source or self.name}': unknown operator {self.op!r}")
        self.inputs = tuple(self.inputs)

    @property
    def where(self) -> str:
        """How error messages name this node."""
        return f"node '{self.source or self.name}' ({self.op})"


@dataclass
class Graph:
    """A model: nodes in topological order, the first being the single input.

    `input_shape` is the model's declared per-sample input shape: the contract recorded in
    the manifest. `notes` collect what passes changed that a user should know about."""

    nodes: list[Node]
    output: str
    input_shape: tuple[int, ...]
    name: str = "model"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    def consumers(self) -> dict[str, list[Node]]:
        """For each tensor, the nodes that read it (the output counts as no consumer)."""
        users: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n)
        return users

    def copy(self) -> Graph:
        nodes = [Node(n.name, n.op, n.inputs, dict(n.attrs), n.source) for n in self.nodes]
        return Graph(nodes, self.output, self.input_shape, self.name, dict(self.shapes), list(self.notes))

    def check(self) -> None:
        """Structural invariants every pass must keep: one input first, topological order,
        unique names, known inputs, a reachable output, known shapes."""
        if not self.nodes or self.nodes[0].op != "input":
            raise ModelError("the graph must start with its input")
        seen: set[str] = set()
        for n in self.nodes:
            if n.name in seen:
                raise ModelError(f"{n.where}: duplicate node name {n.name!r}")
            if n.op == "input" and n is not self.nodes[0]:
                raise ModelError(f"{n.where}: a second input; Gravel models take exactly one input")
            for i in n.inputs:
                if i not in seen:
                    raise ModelError(f"{n.where}: reads {i!r}, which is not computed before it")
            seen.add(n.name)
        if self.output not in seen:
            raise ModelError(f"the graph's output {self.output!r} is not computed by any node")
        infer_shapes(self)

    def prune(self) -> None:
        """Drop nodes the output does not depend on."""
        needed = {self.output}
        for n in reversed(self.nodes):
            if n.name in needed:
                needed.update(n.inputs)
        self.nodes = [n for n in self.nodes if n.name in needed or n.op == "input"]

    def summary(self) -> str:
        lines = []
        for n in self.nodes:
            shape = self.shapes.get(n.name)
            lines.append(f"{n.name:<24} {n.op:<10} {','.join(n.inputs):<30} {shape}")
        return "\n".join(lines)


# ---------------------------------------------------------------- reference semantics (numpy)


def _pair(v: Any) -> tuple[int, int]:
    v = tuple(int(a) for a in (v if isinstance(v, (tuple, list, np.ndarray)) else (v, v)))
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _window_out(size: int, k: int, stride: int, pad_a: int, pad_b: int, dil: int = 1, ceil: bool = False) -> int:
    span = dil * (k - 1) + 1
    num = size + pad_a + pad_b - span
    out = (-(-num // stride) if ceil else num // stride) + 1
    if ceil and (out - 1) * stride >= size + pad_a:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def window_shape(node: Node, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """Output (H, W) of a conv or pooling node on a (C, H, W) input."""
    a = node.attrs
    kh, kw = _pair(a["kernel"]) if "kernel" in a else a["weight"].shape[2:]
    sh, sw = _pair(a.get("strides", 1))
    t, l, b, r = a.get("pads", (0, 0, 0, 0))
    dh, dw = _pair(a.get("dilations", 1))
    ceil = bool(a.get("ceil_mode", 0))
    return (
        _window_out(in_shape[1], kh, sh, t, b, dh, ceil),
        _window_out(in_shape[2], kw, sw, l, r, dw, ceil),
    )


def windows(x: np.ndarray, node: Node, pad_value: float = 0.0, overhang_value: float | None = None) -> np.ndarray:
    """(N, C, kh*kw, Ho, Wo) sliding windows of a (N, C, H, W) batch, padded with `pad_value`
    (and, where ceil_mode windows overhang the padding, with `overhang_value`)."""
    a = node.attrs
    kh, kw = _pair(a["kernel"]) if "kernel" in a else a["weight"].shape[2:]
    sh, sw = _pair(a.get("strides", 1))
    t, l, b, r = a.get("pads", (0, 0, 0, 0))
    dh, dw = _pair(a.get("dilations", 1))
    ho, wo = window_shape(node, x.shape[1:])
    # extra right/bottom padding for ceil_mode windows that overhang
    need_h = (ho - 1) * sh + dh * (kh - 1) + 1
    need_w = (wo - 1) * sw + dw * (kw - 1) + 1
    eb = max(0, need_h - (x.shape[2] + t + b))
    er = max(0, need_w - (x.shape[3] + l + r))
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=pad_value)
    fill = pad_value if overhang_value is None else overhang_value
    xp = np.pad(xp, ((0, 0), (0, 0), (0, eb), (0, er)), constant_values=fill)
    out = np.empty(x.shape[:2] + (kh * kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i * kw + j] = xp[:, :, i * dh : i * dh + sh * ho : sh, j * dw : j * dw + sw * wo : sw]
    return out


def conv2d(x: np.ndarray, node: Node) -> np.ndarray:
    """Grouped, strided, dilated 2-D convolution of a (N, C, H, W) batch."""
    w = node.attrs["weight"]
    g = int(node.attrs.get("group", 1))
    o, cg, kh, kw = w.shape
    cols = windows(x, node)  # (N, C, k, Ho, Wo)
    n, c, k, ho, wo = cols.shape
    cols = cols.reshape(n, g, cg, k, ho, wo)
    wg = w.reshape(g, o // g, cg, kh * kw)
    out = np.einsum("ngckuv,gock->ngouv", cols, wg).reshape(n, o, ho, wo)
    b = np.asarray(node.attrs["bias"])
    return out + (b.reshape(1, -1, 1, 1) if b.ndim == 1 else b[None])


def _avgpool(x: np.ndarray, node: Node) -> np.ndarray:
    cols = windows(x, node)
    ones = np.ones((1, 1) + x.shape[2:], dtype=x.dtype)
    if node.attrs.get("count_include_pad", 0):
        count = windows(ones, node, pad_value=1.0, overhang_value=0.0)
    else:
        count = windows(ones, node)
    return cols.sum(axis=2) / count.sum(axis=2)


def _maxpool(x: np.ndarray, node: Node) -> np.ndarray:
    return windows(x, node, pad_value=-np.inf).max(axis=2)


def evaluate(
    graph: Graph, x: np.ndarray, keep: bool = False
) -> np.ndarray | dict[str, np.ndarray]:
    """Run the graph in float64 on a batch `x` of shape (N, *input_shape).

    With `keep`, return every node's output (for calibration); otherwise the output's."""
    x = np.asarray(x, dtype=np.float64)
    if tuple(x.shape[1:]) != tuple(graph.input_shape):
        raise ModelError(f"input batch of shape {x.shape[1:]} per sample; the model expects {graph.input_shape}")
    values: dict[str, np.ndarray] = {}
    users = graph.consumers()
    remaining = {k: len(v) for k, v in users.items()}
    for node in graph.nodes:
        args = [values[i] for i in node.inputs]
        values[node.name] = _eval_node(node, args, x)
        if not keep:
            for i in node.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i != graph.output:
                    del values[i]
    return values if keep else values[graph.output]


def _eval_node(node: Node, args: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    a = node.attrs
    op = node.op
    if op == "input":
        return x
    if op == "gemm":
        return args[0] @ a["weight"].T + a["bias"]
    if op == "conv":
        return conv2d(args[0], node)
    if op == "affine":
        return args[0] * a["scale"] + a["shift"]
    if op == "act":
        return activation(a["fn"], a.get("params"))(args[0])
    if op == "add":
        return args[0] + args[1]
    if op == "sub":
        return args[0] - args[1]
    if op == "mul":
        return args[0] * args[1]
    if op == "maxpool":
        return _maxpool(args[0], node)
    if op == "avgpool":
        return _avgpool(args[0], node)
    if op == "reshape":
        return args[0].reshape((args[0].shape[0],) + tuple(a["shape"]))
    if op == "transpose":
        return np.transpose(args[0], (0,) + tuple(p + 1 for p in a["perm"]))
    if op == "concat":
        return np.concatenate(args, axis=a["axis"] + 1)
    if op == "pad":
        pads = a["pads"]
        half = len(pads) // 2
        width = [(0, 0)] + [(pads[i], pads[i + half]) for i in range(half)]
        return np.pad(args[0], width, constant_values=a.get("value", 0.0))
    if op == "softmax":
        z = args[0] - args[0].max(axis=a["axis"] + 1, keepdims=True)
        e = np.exp(z)
        if a.get("log"):  # LogSoftmax
            return z - np.log(e.sum(axis=a["axis"] + 1, keepdims=True))
        return e / e.sum(axis=a["axis"] + 1, keepdims=True)
    raise ModelError(f"{node.where}: no reference semantics")  # pragma: no cover - OPS is closed


def _broadcast(a: tuple[int, ...], b: tuple[int, ...], node: Node) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise ModelError(f"{node.where}: shapes {a} and {b} do not broadcast") from None


def infer_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every node (filled into `graph.shapes`); refuses what does
    not fit, naming the node."""
    shapes: dict[str, tuple[int, ...]] = {}
    for node in graph.nodes:
        ins = [shapes[i] for i in node.inputs]
        shapes[node.name] = node_shape(node, ins, graph.input_shape)
    graph.shapes = shapes
    return shapes


def node_shape(node: Node, ins: list[tuple[int, ...]], input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample output shape of `node` given its inputs' shapes (refuses what does not fit)."""
    a = node.attrs
    op = node.op
    if op == "input":
        return tuple(input_shape)
    s = ins[0] if ins else ()
    if op == "gemm":
        w = a["weight"]
        if not s or s[-1] != w.shape[1]:
            raise ModelError(f"{node.where}: weight expects {w.shape[1]} input features, gets shape {s}")
        return s[:-1] + (w.shape[0],)
    if op in ("conv", "maxpool", "avgpool"):
        if len(s) != 3:
            raise ModelError(f"{node.where}: needs a (C, H, W) input, gets shape {s}")
        if op == "conv":
            w = a["weight"]
            g = int(a.get("group", 1))
            if s[0] != w.shape[1] * g or w.shape[0] % g:
                raise ModelError(f"{node.where}: weight {w.shape} with group={g} does not fit {s[0]} input channels")
            c = w.shape[0]
        else:
            c = s[0]
        ho, wo = window_shape(node, s)
        if ho < 1 or wo < 1:
            raise ModelError(f"{node.where}: window larger than its input {s}")
        return (c, ho, wo)
    if op == "affine":
        out = _broadcast(s, np.shape(a["scale"]), node)
        out = _broadcast(out, np.shape(a["shift"]), node)
        if out != s:
            raise ModelError(f"{node.where}: constants of shape {np.shape(a['scale'])} would grow {s} to {out}")
        return s
    if op in ("act", "softmax"):
        return s
    if op in ("add", "sub", "mul"):
        return _broadcast(ins[0], ins[1], node)
    if op == "reshape":
        target = tuple(int(d) for d in a["shape"])
        if math.prod(target) != math.prod(s):
            raise ModelError(f"{node.where}: cannot reshape {s} ({math.prod(s)} values) to {target}")
        return target
    if op == "transpose":
        perm = tuple(a["perm"])
        if sorted(perm) != list(range(len(s))):
            raise ModelError(f"{node.where}: permutation {perm} does not fit shape {s}")
        return tuple(s[p] for p in perm)
    if op == "concat":
        axis = a["axis"]
        first = ins[0]
        for other in ins[1:]:
            if len(other) != len(first) or any(d != e for k, (d, e) in enumerate(zip(first, other)) if k != axis):
                raise ModelError(f"{node.where}: cannot concatenate shapes {first} and {other} on axis {axis}")
        return first[:axis] + (sum(i[axis] for i in ins),) + first[axis + 1 :]
    if op == "pad":
        pads = a["pads"]
        if len(pads) != 2 * len(s):
            raise ModelError(f"{node.where}: {len(pads)} pad values for a {len(s)}-d tensor")
        half = len(s)
        return tuple(d + pads[i] + pads[i + half] for i, d in enumerate(s))
    raise ModelError(f"{node.where}: no shape rule")  # pragma: no cover
