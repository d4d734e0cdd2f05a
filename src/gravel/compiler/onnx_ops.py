"""How each ONNX operator on computed tensors becomes IR nodes: one handler per operator type.

A handler gets the importer, the ONNX node, its inputs (a `Tensor` computed from the model's
input, a `Const`, or None for an omitted optional input), the node's attributes and the name
to record as the IR nodes' source; it returns the value of the node's first output, and raises
`NodeProblem` (why, and what to do) for a use Gravel does not import. `onnx_import` reports
those, all at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from gravel.compiler.graph_builder import BATCH_HYPOTHESES, Const, NodeProblem, Tensor, same_pads

if TYPE_CHECKING:
    from gravel.compiler.onnx_import import _Importer

__all__ = ["COMPARISON", "FLOAT_TYPES", "HANDLERS"]

FLOAT_TYPES = {1, 10, 11, 16}  # ONNX float, float16, double, bfloat16


class _Comparison:
    """A comparison of a computed tensor, which only torch's Softplus pattern may read."""


COMPARISON = _Comparison()

Handler = Callable[["_Importer", Any, list[Any], dict[str, Any], str], Any]
HANDLERS: dict[str, Handler] = {}


def _handles(*ops: str) -> Callable[[Handler], Handler]:
    def register(f: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = f
        return f

    return register


_SIMPLE_ACTS = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hard_swish",
    "Erf": "erf", "Softplus": "softplus", "Softsign": "softsign", "Mish": "mish", "Abs": "abs",
    "Sqrt": "sqrt", "Exp": "exp", "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil",
    "Round": "round",
}


@_handles(*_SIMPLE_ACTS)
def _simple_act(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    return imp.b.act(imp.tensor(ins[0]), _SIMPLE_ACTS[node.op_type], src)


@_handles("LeakyRelu", "Elu", "Celu", "Selu", "HardSigmoid", "Gelu")
def _param_act(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    op = node.op_type
    if op == "LeakyRelu":
        return imp.b.act(x, "leaky_relu", src, {"alpha": float(a.get("alpha", 0.01))})
    if op in ("Elu", "Celu"):
        return imp.b.act(x, op.lower(), src, {"alpha": float(a.get("alpha", 1.0))})
    if op == "Selu":
        return imp.b.act(x, "selu", src, {
            "alpha": float(a.get("alpha", 1.67326319217681884765625)),
            "gamma": float(a.get("gamma", 1.05070102214813232421875)),
        })
    if op == "HardSigmoid":
        return imp.b.act(x, "hard_sigmoid", src, {"alpha": float(a.get("alpha", 0.2)), "beta": float(a.get("beta", 0.5))})
    approx = a.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise NodeProblem(f"unknown Gelu approximation {approx!r}")
    return imp.b.act(x, "gelu" if approx == "none" else "gelu_tanh", src)


@_handles("Neg")
def _neg(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    return imp.b.affine(imp.tensor(ins[0]), src, scale=-1.0)


@_handles("Sign")
def _sign(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    return imp.b.sign(imp.tensor(ins[0]), src)


@_handles("PRelu")
def _prelu(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    slope = imp.b.const_for(x, imp.const(ins[1], "the PRelu slope"), "the PRelu slope")
    flat = slope.reshape(-1)
    param: Any = float(flat[0]) if np.all(flat == flat[0]) else slope
    return imp.b.act(x, "prelu", src, {"slope": param})


@_handles("Clip", "Max", "Min")
def _clip(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    params: dict[str, float] = {}
    if node.op_type == "Clip":
        x = imp.tensor(ins[0])
        for k, key in ((1, "min"), (2, "max")):
            if len(ins) > k and ins[k] is not None:
                params[key] = imp.scalar(ins[k], f"the Clip {key}")
            elif key in a:
                params[key] = float(a[key])
    else:
        tensors = [v for v in ins if isinstance(v, Tensor)]
        if len(tensors) != 1:
            raise NodeProblem(f"{node.op_type} of several computed tensors is not univariate; Gravel supports {node.op_type} with constants")
        x = tensors[0]
        bounds = [imp.scalar(v, f"each other {node.op_type} operand") for v in ins if isinstance(v, Const)]
        key = "min" if node.op_type == "Max" else "max"
        params[key] = (max if key == "min" else min)(bounds)
    if not params:
        return x
    return imp.b.act(x, "clip", src, params)


@_handles("Pow")
def _pow(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0], "base")
    if not isinstance(ins[1], Const):
        raise NodeProblem("Pow with a computed exponent is not supported; the exponent must be a constant")
    return imp.b.power(x, imp.scalar(ins[1], "the exponent"), src)


@_handles("Add", "Sub", "Mul", "Div", "Sum")
def _arith(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    b = imp.b
    op = node.op_type
    if op == "Sum":
        tensors = [v for v in ins if isinstance(v, Tensor)]
        consts = [v for v in ins if isinstance(v, Const)]
        y = tensors[0]
        for t in tensors[1:]:
            y = b.binary("add", y, t, src)
        for c in consts:
            y = b.affine(y, src, shift=b.const_for(y, c, "the constant term"))
        return y
    x, y = ins
    if op == "Add" and not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        k = 0 if isinstance(x, Tensor) else 1
        t, c = ins[k], ins[1 - k]
        if t.name in imp.from_matmul and imp.consumers.get(node.input[k]) == 1:
            folded = _fold_bias(imp, t, c, src)
            if folded is not None:
                return folded
    return b.arith(op.lower(), x, y, src)


def _fold_bias(imp: _Importer, t: Tensor, c: Const, src: str) -> Tensor | None:
    """MatMul followed by Add of a constant that varies along the last axis only: the
    constant becomes the gemm's bias (the caller checks nothing else reads the MatMul)."""
    node = imp.b.node_of(t)
    try:
        p = imp.b.const_for(t, c)
    except NodeProblem:
        return None
    if any(d != 1 for d in p.shape[:-1]):
        return None
    node.attrs["bias"] = np.broadcast_to(p.reshape(-1), node.attrs["bias"].shape).astype(np.float64).copy()
    node.source = f"{node.source}+{src}"
    imp.from_matmul.discard(t.name)
    return t


@_handles("Gemm")
def _gemm(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = ins[0]
    if not isinstance(x, Tensor) or not isinstance(ins[1], Const):
        raise NodeProblem("Gemm needs the computed tensor as its first operand and a constant weight as its second")
    if a.get("transA", 0):
        raise NodeProblem("transA=1 would transpose the batch axis into the features")
    if len(x.shape) != 1:
        raise NodeProblem(f"Gemm needs a (batch, features) input, gets per-sample shape {x.shape}")
    w = np.asarray(ins[1].value("the Gemm weight"), dtype=np.float64)
    w = w if a.get("transB", 0) else w.T  # (out, in)
    weight = float(a.get("alpha", 1.0)) * w
    beta = float(a.get("beta", 1.0))
    c = ins[2] if len(ins) > 2 else None
    if isinstance(c, Tensor):
        y = imp.b.gemm(x, weight, None, src)
        return imp.b.binary("add", y, imp.b.affine(c, src, scale=beta), src)
    bias = None
    if c is not None:
        v = np.asarray(c.uniform_over_batch("the Gemm bias"), dtype=np.float64)
        if v.ndim == 2 and v.shape[0] != 1:
            raise NodeProblem(f"Gemm bias of shape {v.shape} varies over the batch axis")
        bias = beta * np.broadcast_to(v.reshape(-1) if v.ndim else v, (weight.shape[0],))
    return imp.b.gemm(x, weight, bias, src)


@_handles("MatMul")
def _matmul(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    y = imp.b.matmul(ins[0], ins[1], src)
    n = imp.b.node_of(y)
    if n.op == "gemm" and isinstance(ins[0], Tensor):
        imp.from_matmul.add(y.name)
    return y


def _window_attrs(imp: _Importer, x: Tensor, a: dict[str, Any], kernel: tuple[int, int], what: str) -> dict[str, Any]:
    """strides, explicit pads and dilations of a 2-D conv or pooling node."""
    if len(x.shape) != 3:
        raise NodeProblem(f"{what} needs a (C, H, W) input per sample, gets {x.shape}; Gravel supports 2-D {what} only")
    strides = tuple(int(s) for s in a.get("strides", (1, 1)))
    dilations = tuple(int(d) for d in a.get("dilations", (1, 1)))
    if len(strides) != 2 or len(dilations) != 2:
        raise NodeProblem(f"{what} attributes are not 2-D; Gravel supports 2-D {what} only")
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = tuple(int(p) for p in a.get("pads", (0, 0, 0, 0)))
    elif auto == "VALID":
        pads = (0, 0, 0, 0)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(x.shape[1:], kernel, strides, dilations, lower=auto == "SAME_LOWER")
    else:
        raise NodeProblem(f"unknown auto_pad {auto!r}")
    if len(pads) != 4 or any(p < 0 for p in pads):
        raise NodeProblem(f"pads {pads} are not four non-negative numbers")
    return {"strides": strides, "pads": pads, "dilations": dilations}


@_handles("Conv")
def _conv(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    w = np.asarray(imp.const(ins[1], "the Conv weight").value("the Conv weight"), dtype=np.float64)
    if w.ndim != 4:
        raise NodeProblem(f"{w.ndim - 2}-D convolution; Gravel supports 2-D convolution (Conv2d) only")
    if "kernel_shape" in a and tuple(a["kernel_shape"]) != w.shape[2:]:
        raise NodeProblem(f"kernel_shape {a['kernel_shape']} does not match the weight {w.shape}")
    bias = None
    if len(ins) > 2 and ins[2] is not None:
        bias = np.asarray(imp.const(ins[2], "the Conv bias").value("the Conv bias"), dtype=np.float64)
    attrs = _window_attrs(imp, x, a, (w.shape[2], w.shape[3]), "convolution")
    attrs.update(weight=w, bias=np.zeros(w.shape[0]) if bias is None else bias.reshape(-1), group=int(a.get("group", 1)))
    return imp.b.emit("conv", [x], attrs, src)


@_handles("MaxPool", "AveragePool")
def _pool(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    kernel = tuple(int(k) for k in a.get("kernel_shape", ()))
    if len(kernel) != 2:
        raise NodeProblem(f"{len(kernel)}-D pooling; Gravel supports 2-D pooling only")
    attrs = _window_attrs(imp, x, a, kernel, "pooling")
    attrs["kernel"] = kernel
    if a.get("ceil_mode", 0):
        attrs["ceil_mode"] = 1
    if node.op_type == "MaxPool":
        if a.get("storage_order", 0) and imp.consumers.get(node.output[1] if len(node.output) > 1 else "", 0):
            raise NodeProblem("MaxPool indices are not supported")
        return imp.b.emit("maxpool", [x], attrs, src)
    attrs["count_include_pad"] = int(a.get("count_include_pad", 0))
    return imp.b.emit("avgpool", [x], attrs, src)


@_handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    op = "avgpool" if node.op_type == "GlobalAveragePool" else "maxpool"
    return imp.b.global_pool(imp.tensor(ins[0]), op, src)


@_handles("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    if len(ins) > 1 and ins[1] is not None:
        axes = imp.ints(ins[1], "the reduced axes")
    else:
        axes = list(a.get("axes", []))
    if not axes:
        raise NodeProblem("a reduction over every axis would include the batch axis")
    per = sorted(imp.b.axis(x, ax, "reduced axis") for ax in axes)
    if len(x.shape) != 3 or per != [1, 2]:
        raise NodeProblem(
            f"{node.op_type} over per-sample axes {per} of {x.shape}: only the spatial (H, W) "
            "reduction of a (C, H, W) tensor (global pooling) is supported"
        )
    y = imp.b.global_pool(x, "maxpool" if node.op_type == "ReduceMax" else "avgpool", src)
    if node.op_type == "ReduceSum":
        y = imp.b.affine(y, src, scale=float(x.shape[1] * x.shape[2]))
    if not a.get("keepdims", 1):
        y = imp.b.reshape(y, (x.shape[0],), src)
    return y


@_handles("BatchNormalization")
def _batch_norm(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    if a.get("training_mode", 0):
        raise NodeProblem("batch norm in training mode uses batch statistics; export the model in eval() mode")
    x = imp.tensor(ins[0])
    vals = [imp.const(v, "batch norm parameters").value("batch norm parameters") for v in ins[1:5]]
    return imp.b.batch_norm(x, *vals, float(a.get("epsilon", 1e-5)), src)


@_handles("Flatten")
def _flatten(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    axis = int(a.get("axis", 1))
    axis = axis + x.full_rank if axis < 0 else axis
    if axis != 1:
        raise NodeProblem(f"Flatten with axis={a.get('axis')} would merge the batch axis with others; use axis=1")
    return imp.b.reshape(x, (math.prod(x.shape),), src)


@_handles("Reshape")
def _reshape(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    if not isinstance(ins[1], Const):
        raise NodeProblem("the target shape is computed from data; Gravel needs a constant target shape")
    return imp.b.reshape_full(x, ins[1], src, allowzero=bool(a.get("allowzero", 0)))


@_handles("Transpose")
def _transpose(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    perm = a.get("perm", list(reversed(range(x.full_rank))))
    return imp.b.transpose_full(x, perm, src)


@_handles("Squeeze", "Unsqueeze")
def _squeeze(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    if len(ins) > 1 and ins[1] is not None:
        axes: list[int] | None = imp.ints(ins[1], "the axes")
    else:
        axes = list(a["axes"]) if "axes" in a else None
    if node.op_type == "Squeeze":
        return imp.b.squeeze(x, axes, src)
    if not axes:
        raise NodeProblem("Unsqueeze needs axes")
    return imp.b.unsqueeze(x, axes, src)


@_handles("Concat")
def _concat(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    parts = [v for v in ins if v is not None]
    if not all(isinstance(v, Tensor) for v in parts):
        raise NodeProblem(
            "concatenation of computed tensors with a constant tensor is not supported; "
            "concatenate computed tensors only"
        )
    return imp.b.concat(parts, int(a["axis"]), src)


@_handles("Pad")
def _pad(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    mode = a.get("mode", "constant")
    if mode != "constant":
        raise NodeProblem(f"Pad mode {mode!r} is not supported (only constant padding); pad with zeros or a constant")
    if len(ins) > 1 and ins[1] is not None:
        pads = imp.ints(ins[1], "the pads")
    else:
        pads = [int(p) for p in a.get("pads", [])]
    value = 0.0
    if len(ins) > 2 and ins[2] is not None:
        value = imp.scalar(ins[2], "the pad value")
    elif "value" in a:
        value = float(a["value"])
    if len(ins) > 3 and ins[3] is not None:
        axes = [ax + x.full_rank if ax < 0 else ax for ax in imp.ints(ins[3], "the pad axes")]
        full = [0] * (2 * x.full_rank)
        half = len(axes)
        for k, ax in enumerate(axes):
            full[ax], full[ax + x.full_rank] = pads[k], pads[k + half]
        pads = full
    return imp.b.pad_full(x, pads, value, src)


@_handles("Identity", "Dropout")
def _identity(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Any:
    training = node.op_type == "Dropout" and len(ins) > 2 and ins[2] is not None
    if training and bool(np.asarray(imp.const(ins[2], "training_mode").value("training_mode"))):
        raise NodeProblem("Dropout in training mode is random; export the model in eval() mode")
    return ins[0]


@_handles("Cast", "CastLike")
def _cast(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Any:
    if node.op_type == "CastLike" and isinstance(ins[0], Const):
        # a constant cast to a computed tensor's type (the dynamo exporter's bias and clip
        # bounds): computed tensors are float, so the result is the constant as float
        return Const(np.asarray(ins[0].a, np.float32), np.asarray(ins[0].b, np.float32))
    x = imp.tensor(ins[0])
    if node.op_type == "Cast":
        ok = int(a.get("to", 0)) in FLOAT_TYPES
    else:
        like = ins[1]
        ok = isinstance(like, Tensor) or np.issubdtype(np.asarray(like.a).dtype, np.floating)
    if not ok:
        raise NodeProblem("a cast of a computed tensor to a non-float type is not supported")
    return x


@_handles("Softmax", "LogSoftmax")
def _softmax(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    return imp.b.softmax(imp.tensor(ins[0]), int(a.get("axis", -1)), src, log=node.op_type == "LogSoftmax")


@_handles("Shape", "Size")
def _shape(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Const:
    x = imp.tensor(ins[0])
    batches = (1, 1) if imp.b.batch_fixed else BATCH_HYPOTHESES
    full = [np.array((n, *x.shape), dtype=np.int64) for n in batches]
    if node.op_type == "Size":
        return Const(np.int64(full[0].prod()), np.int64(full[1].prod()))
    start, end = int(a.get("start", 0)), a.get("end")
    sl = slice(start, None if end is None else int(end))
    return Const(full[0][sl], full[1][sl])


@_handles("Expand")
def _expand(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    x = imp.tensor(ins[0])
    target = imp.const(ins[1], "the Expand shape")
    for full, n in ((target.a, BATCH_HYPOTHESES[0]), (target.b, BATCH_HYPOTHESES[1])):
        shape = (1 if imp.b.batch_fixed else n, *x.shape)
        if tuple(np.broadcast_shapes(shape, tuple(int(d) for d in np.asarray(full).reshape(-1)))) != shape:
            raise NodeProblem("Expand that grows a computed tensor is not supported")
    return x


@_handles("Where")
def _where(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Tensor:
    """torch's Softplus(beta, threshold) exports as Where(Greater(beta*x, threshold), x,
    Softplus(beta*x)/beta): above the threshold (20 by default) the two branches differ by
    less than exp(-threshold), so the Where is the Softplus branch."""
    _, then, other = ins
    producers = {o: n for n in imp.graph.node for o in n.output}
    greater = producers.get(node.input[0])
    soft = producers.get(node.input[2])
    while soft is not None and soft.op_type in ("Div", "Mul") and soft.input[0] in producers:
        soft = producers.get(soft.input[0])
    if (
        greater is not None and greater.op_type == "Greater" and soft is not None
        and soft.op_type == "Softplus" and isinstance(other, Tensor) and isinstance(then, Tensor)
        and isinstance(imp.env.get(greater.input[1]), Const)
        and imp.scalar(imp.env[greater.input[1]], "the threshold") >= 15
    ):
        return other
    raise NodeProblem("Where on computed tensors is not supported (only torch's Softplus threshold pattern)")


@_handles("Greater")
def _greater(imp: _Importer, node: Any, ins: list[Any], a: dict[str, Any], src: str) -> Any:
    """A comparison of a computed tensor: only the Where pattern above may read it."""
    imp.tensor(ins[0])
    return COMPARISON
