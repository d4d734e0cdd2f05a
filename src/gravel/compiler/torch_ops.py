"""How torch modules, functions and Tensor methods become IR nodes, for `torch_import`.

A handler gets the importer, the fx node, the module it calls (for call_module), the node's
arguments with each fx node replaced by its value (a `Tensor` computed from the model's input
or a `Const` from the recorded runs; literals stay as they are), and the name to record as the
IR nodes' source. It returns the computed `Tensor`, or raises `NodeProblem` (why, and what to
do) for a use Gravel does not import. Calls missing from these tables send the model through
an ONNX export instead.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from gravel.compiler.graph_builder import Const, GraphBuilder, NodeProblem, Tensor, same_pads
from gravel.model.quant import InputQuant, QuantReLU, SignActivation

if TYPE_CHECKING:
    from gravel.compiler.torch_import import _FxImporter

__all__ = ["FUNCTIONS", "METHODS", "flat", "module_handler"]


def flat(v: Any) -> list[Any]:
    if isinstance(v, (tuple, list)):
        return [i for e in v for i in flat(e)]
    if isinstance(v, dict):
        return [i for e in v.values() for i in flat(e)]
    return [v]



# ------------------------------------------------------------------------------ arguments


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, key: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _lit(v: Any, what: str) -> Any:
    """A known argument as a plain Python value (refusing a computed tensor)."""
    if isinstance(v, Tensor):
        raise NodeProblem(f"{what} must be a constant, not computed from the input")
    if isinstance(v, Const):
        v = v.value(what)
    if isinstance(v, np.ndarray):
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, (tuple, list)):
        return type(v)(_lit(e, what) for e in v)
    return v


def _known(v: Any, what: str) -> Const:
    """An operand that is not computed, as a Const (python scalars included)."""
    if isinstance(v, Const):
        return v
    if isinstance(v, (tuple, list)) and any(isinstance(e, Const) for e in v):
        a = [e.a if isinstance(e, Const) else e for e in v]
        b = [e.b if isinstance(e, Const) else e for e in v]
        return Const(np.asarray(a), np.asarray(b))
    if isinstance(v, (int, float, bool, np.ndarray, tuple, list)):
        return Const.of(np.asarray(v))
    raise NodeProblem(f"{what} of type {type(v).__name__} is not supported")


def _tensor(v: Any, what: str = "input") -> Tensor:
    if not isinstance(v, Tensor):
        raise NodeProblem(f"its {what} must be computed from the model's input")
    return v


def _pair(v: Any) -> tuple[int, int]:
    v = _lit(v, "a window size")
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    return int(v), int(v)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy().copy()


# ------------------------------------------------------------------------------ handlers

Handler = Callable[["_FxImporter", fx.Node, Any, list[Any], dict[str, Any], str], Any]


def _act(fn: str, **params: Any) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        return imp.b.act(_tensor(args[0]), fn, src, params)

    return handler


def _alias(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    return _tensor(args[0])


def _dropout(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    if bool(_lit(_arg(args, kw, 2, "training", False), "training")):
        raise NodeProblem("dropout called with training=True is random; pass training=self.training")
    return _tensor(args[0])


def _clamp_to(lo: float | None, hi: float | None) -> dict[str, float]:
    return {k: float(v) for k, v in (("min", lo), ("max", hi)) if v is not None}


def _clamp(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    lo, hi = _arg(args, kw, 1, "min"), _arg(args, kw, 2, "max")
    params = _clamp_to(_lit(lo, "the lower bound"), _lit(hi, "the upper bound"))
    return imp.b.act(x, "clip", src, params) if params else x


def _hardtanh(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    lo = _lit(_arg(args, kw, 1, "min_val", -1.0), "min_val")
    hi = _lit(_arg(args, kw, 2, "max_val", 1.0), "max_val")
    return imp.b.act(_tensor(args[0]), "clip", src, _clamp_to(lo, hi))


def _leaky(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    slope = _lit(_arg(args, kw, 1, "negative_slope", 0.01), "negative_slope")
    return imp.b.act(_tensor(args[0]), "leaky_relu", src, {"alpha": float(slope)})


def _alpha_act(fn: str) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        alpha = _lit(_arg(args, kw, 1, "alpha", 1.0), "alpha")
        return imp.b.act(_tensor(args[0]), fn, src, {"alpha": float(alpha)})

    return handler


def _gelu(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    approx = _lit(kw.get("approximate", args[1] if len(args) > 1 else "none"), "approximate")
    return imp.b.act(_tensor(args[0]), "gelu_tanh" if approx == "tanh" else "gelu", src)


def _softplus(b: GraphBuilder, x: Tensor, beta: float, src: str) -> Tensor:
    """softplus(beta * x) / beta (torch's threshold, 20 by default, changes it by less than
    exp(-20))."""
    if beta == 1.0:
        return b.act(x, "softplus", src)
    y = b.act(b.affine(x, src, scale=beta), "softplus", src)
    return b.affine(y, src, scale=1.0 / beta)


def _softplus_fn(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    beta = float(_lit(_arg(args, kw, 1, "beta", 1.0), "beta"))
    return _softplus(imp.b, _tensor(args[0]), beta, src)


def _prelu_slope(x: Tensor, w: np.ndarray) -> Any:
    w = w.reshape(-1)
    if w.size == 1:
        return float(w[0])
    if not x.shape or x.shape[0] != w.size:
        raise NodeProblem(f"PReLU with {w.size} slopes does not fit {x.shape} (channels first)")
    return w.reshape((w.size,) + (1,) * (len(x.shape) - 1))


def _prelu_fn(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    w = np.asarray(_known(_arg(args, kw, 1, "weight"), "the PReLU weight").value("the PReLU weight"), dtype=np.float64)
    return imp.b.act(x, "prelu", src, {"slope": _prelu_slope(x, w)})


def _sign(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    return imp.b.sign(_tensor(args[0]), src)


def _neg(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    return imp.b.affine(_tensor(args[0]), src, scale=-1.0)


def _round(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    if _lit(kw.get("decimals", 0), "decimals"):
        raise NodeProblem("round with decimals is not supported")
    return imp.b.act(_tensor(args[0]), "round", src)


def _pow(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    base, e = args[0], _arg(args, kw, 1, "exponent")
    if not isinstance(base, Tensor) or isinstance(e, Tensor):
        raise NodeProblem("a power with a computed exponent is not supported; the exponent must be a constant")
    e = np.asarray(_known(e, "the exponent").value("the exponent"), dtype=np.float64)
    if e.size != 1:
        raise NodeProblem("the exponent must be one number")
    return imp.b.power(base, float(e.reshape(-1)[0]), src)


def _softmax(log: bool) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        dim = _lit(_arg(args, kw, 1, "dim"), "dim")
        if dim is None:
            raise NodeProblem("softmax needs an explicit dim")
        return imp.b.softmax(_tensor(args[0]), int(dim), src, log=log)

    return handler


def _arith(op: str) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        x, y = args[0], _arg(args, kw, 1, "other")
        if op == "div" and kw.get("rounding_mode") is not None:
            raise NodeProblem("division with a rounding mode is not supported")
        alpha = kw.get("alpha", 1)
        if op in ("add", "sub") and _lit(alpha, "alpha") != 1:
            if isinstance(y, Tensor):
                y = imp.b.affine(y, src, scale=float(_lit(alpha, "alpha")))
            else:
                y = Const.of(np.asarray(_known(y, "operand").value("operand")) * _lit(alpha, "alpha"))
        x = x if isinstance(x, Tensor) else _known(x, "operand")
        y = y if isinstance(y, Tensor) else _known(y, "operand")
        return imp.b.arith(op, x, y, src)

    return handler


def _matmul(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    a, c = args[0], _arg(args, kw, 1, "other")
    a = a if isinstance(a, Tensor) else _known(a, "the matrix")
    c = c if isinstance(c, Tensor) else _known(c, "the matrix")
    return imp.b.matmul(a, c, src)


def _linear_fn(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    w = _known(_arg(args, kw, 1, "weight"), "the weight").value("the weight")
    bias = _arg(args, kw, 2, "bias")
    b = None if bias is None else _known(bias, "the bias").value("the bias")
    return imp.b.gemm(x, w, b, src)


def _conv(imp: _FxImporter, x: Tensor, w: np.ndarray, bias: np.ndarray | None, stride: Any, padding: Any,
          dilation: Any, groups: int, src: str, **extra: Any) -> Tensor:
    if w.ndim != 4:
        raise NodeProblem(f"{w.ndim - 2}-D convolution; Gravel supports 2-D convolution (Conv2d) only")
    if len(x.shape) != 3:
        raise NodeProblem(f"Conv2d needs a (C, H, W) input per sample, gets {x.shape}")
    strides, dilations = _pair(stride), _pair(dilation)
    padding = _lit(padding, "padding")
    if padding == "valid":
        pads: tuple[int, ...] = (0, 0, 0, 0)
    elif padding == "same":
        pads = same_pads(x.shape[1:], w.shape[2:], (1, 1), dilations, lower=False)
    else:
        ph, pw = _pair(padding)
        pads = (ph, pw, ph, pw)
    bias = np.zeros(w.shape[0]) if bias is None else bias
    attrs = {"weight": w, "bias": bias, "strides": strides, "pads": pads, "dilations": dilations, "group": int(groups)}
    return imp.b.emit("conv", [x], {**attrs, **extra}, src)


def _conv_fn(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    w = np.asarray(_known(_arg(args, kw, 1, "weight"), "the weight").value("the weight"), dtype=np.float64)
    bias = _arg(args, kw, 2, "bias")
    b = None if bias is None else np.asarray(_known(bias, "the bias").value("the bias"), dtype=np.float64)
    return _conv(imp, x, w, b, _arg(args, kw, 3, "stride", 1), _arg(args, kw, 4, "padding", 0),
                 _arg(args, kw, 5, "dilation", 1), int(_lit(_arg(args, kw, 6, "groups", 1), "groups")), src)


def _pool_attrs(x: Tensor, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil: Any) -> dict[str, Any]:
    if len(x.shape) != 3:
        raise NodeProblem(f"2-D pooling needs a (C, H, W) input per sample, gets {x.shape}")
    k = _pair(kernel)
    stride = _lit(stride, "stride")
    s = k if stride is None or stride == [] or stride == () else _pair(stride)
    ph, pw = _pair(padding)
    attrs: dict[str, Any] = {"kernel": k, "strides": s, "pads": (ph, pw, ph, pw), "dilations": _pair(dilation)}
    if _lit(ceil, "ceil_mode"):
        attrs["ceil_mode"] = 1
    return attrs


def _max_pool_fn(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    if _lit(_arg(args, kw, 6, "return_indices", False), "return_indices"):
        raise NodeProblem("max pooling indices are not supported")
    x = _tensor(args[0])
    attrs = _pool_attrs(x, _arg(args, kw, 1, "kernel_size"), _arg(args, kw, 2, "stride"),
                        _arg(args, kw, 3, "padding", 0), _arg(args, kw, 4, "dilation", 1),
                        _arg(args, kw, 5, "ceil_mode", False))
    return imp.b.emit("maxpool", [x], attrs, src)


def _avg_pool(imp: _FxImporter, x: Tensor, kernel: Any, stride: Any, padding: Any, ceil: Any,
              include_pad: Any, divisor: Any, src: str) -> Tensor:
    if _lit(divisor, "divisor_override") is not None:
        raise NodeProblem("average pooling with divisor_override is not supported")
    attrs = _pool_attrs(x, kernel, stride, padding, 1, ceil)
    del attrs["dilations"]
    attrs["count_include_pad"] = int(bool(_lit(include_pad, "count_include_pad")))
    return imp.b.emit("avgpool", [x], attrs, src)


def _avg_pool_fn(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    return _avg_pool(imp, _tensor(args[0]), _arg(args, kw, 1, "kernel_size"), _arg(args, kw, 2, "stride"),
                     _arg(args, kw, 3, "padding", 0), _arg(args, kw, 4, "ceil_mode", False),
                     _arg(args, kw, 5, "count_include_pad", True), _arg(args, kw, 6, "divisor_override"), src)


def _adaptive(imp: _FxImporter, n: fx.Node, x: Tensor, op: str, src: str) -> Tensor:
    """Adaptive pooling to an output that divides the input: a plain pooling window."""
    out = imp.out_shape(n)
    if len(x.shape) != 3 or len(out) != 3:
        raise NodeProblem(f"adaptive pooling needs a (C, H, W) input per sample, gets {x.shape}")
    (h, w), (oh, ow) = x.shape[1:], out[1:]
    if h % oh or w % ow:
        raise NodeProblem(
            f"adaptive pooling from {h}x{w} to {oh}x{ow}: windows of unequal sizes are not supported; "
            "choose an output size that divides the input"
        )
    if (oh, ow) == (1, 1):
        return imp.b.global_pool(x, op, src)
    k = (h // oh, w // ow)
    attrs: dict[str, Any] = {"kernel": k, "strides": k, "pads": (0, 0, 0, 0)}
    attrs.update({"dilations": (1, 1)} if op == "maxpool" else {"count_include_pad": 0})
    return imp.b.emit(op, [x], attrs, src)


def _adaptive_fn(op: str) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        if op == "maxpool" and _lit(_arg(args, kw, 2, "return_indices", False), "return_indices"):
            raise NodeProblem("max pooling indices are not supported")
        return _adaptive(imp, n, _tensor(args[0]), op, src)

    return handler


def _mean(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    dims = _lit(_arg(args, kw, 1, "dim"), "dim")
    if dims is None:
        raise NodeProblem("a mean over every axis would include the batch axis")
    dims = [dims] if isinstance(dims, int) else list(dims)
    per = sorted(imp.b.axis(x, d, "averaged axis") for d in dims)
    if len(x.shape) != 3 or per != [1, 2]:
        raise NodeProblem(f"a mean over per-sample axes {per} of {x.shape}: only the spatial mean of (C, H, W) is supported")
    y = imp.b.global_pool(x, "avgpool", src)
    return imp.b.reshape(y, imp.out_shape(n), src)


def _batch_norm_fn(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    if _lit(_arg(args, kw, 5, "training", False), "training"):
        raise NodeProblem("batch norm in training mode uses batch statistics; call it with training=False")
    mean = _known(_arg(args, kw, 1, "running_mean"), "running_mean").value("running_mean")
    var = _known(_arg(args, kw, 2, "running_var"), "running_var").value("running_var")
    c = x.shape[0]
    w, bias = _arg(args, kw, 3, "weight"), _arg(args, kw, 4, "bias")
    gamma = np.ones(c) if w is None else _known(w, "weight").value("weight")
    beta = np.zeros(c) if bias is None else _known(bias, "bias").value("bias")
    eps = float(_lit(_arg(args, kw, 7, "eps", 1e-5), "eps"))
    return imp.b.batch_norm(x, gamma, beta, mean, var, eps, src)


def _same_as_torch(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    """view / reshape / flatten / unflatten / squeeze / unsqueeze: a row-major reshape to the
    shape torch computed; `_check_shape` has made sure the batch axis stays first."""
    return imp.b.reshape(_tensor(args[0]), imp.out_shape(n), src)


def _permute(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    dims = args[1:] if len(args) > 1 else [kw["dims"]]
    if len(dims) == 1 and isinstance(_lit(dims[0], "dims"), (list, tuple)):
        dims = _lit(dims[0], "dims")
    return imp.b.transpose_full(x, [int(_lit(d, "dims")) for d in dims], src)


def _transpose(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    r = x.full_rank
    d0 = int(_lit(_arg(args, kw, 1, "dim0"), "dim0")) % r
    d1 = int(_lit(_arg(args, kw, 2, "dim1"), "dim1")) % r
    perm = list(range(r))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return imp.b.transpose_full(x, perm, src)


def _cat(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    parts = _arg(args, kw, 0, "tensors")
    if not all(isinstance(p, Tensor) for p in parts):
        raise NodeProblem("concatenation with a constant tensor is not supported; concatenate computed tensors only")
    dim = int(_lit(_arg(args, kw, 1, "dim", 0), "dim"))
    return imp.b.concat(parts, dim, src)


def _pad(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    pad = [int(p) for p in _lit(_arg(args, kw, 1, "pad"), "pad")]
    mode = _lit(_arg(args, kw, 2, "mode", "constant"), "mode")
    if mode != "constant":
        raise NodeProblem(f"padding mode {mode!r} is not supported (only constant padding)")
    value = _lit(_arg(args, kw, 3, "value", 0.0), "value")
    return imp.b.pad_full(x, _torch_pads(x, pad), float(value or 0.0), src)


def _torch_pads(x: Tensor, pad: list[int]) -> list[int]:
    """torch's (last_begin, last_end, previous_begin, ...) as full-rank (begin..., end...)."""
    r = x.full_rank
    full = [0] * (2 * r)
    for i in range(len(pad) // 2):
        axis = r - 1 - i
        full[axis], full[axis + r] = pad[2 * i], pad[2 * i + 1]
    return full


def _dtype_alias(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    """.float(), .to(dtype), .type_as(...): only float results, which change nothing here."""
    dtypes = [a for a in flat(args[1:]) + flat(kw) if isinstance(a, torch.dtype)]
    if any(not d.is_floating_point for d in dtypes):
        raise NodeProblem("a cast of a computed tensor to a non-float type is not supported")
    return _tensor(args[0])


FUNCTIONS: dict[Any, Handler] = {
    torch.relu: _act("relu"), F.relu: _act("relu"),
    torch.sigmoid: _act("sigmoid"), F.sigmoid: _act("sigmoid"),
    torch.tanh: _act("tanh"), F.tanh: _act("tanh"),
    F.hardsigmoid: _act("hard_sigmoid", alpha=1.0 / 6.0, beta=0.5), F.hardswish: _act("hard_swish"),
    F.silu: _act("silu"), F.mish: _act("mish"), F.softsign: _act("softsign"),
    F.selu: _act("selu"), torch.selu: _act("selu"),
    torch.erf: _act("erf"), torch.special.erf: _act("erf"),
    torch.abs: _act("abs"), operator.abs: _act("abs"),
    torch.exp: _act("exp"), torch.sqrt: _act("sqrt"), torch.reciprocal: _act("reciprocal"),
    torch.floor: _act("floor"), torch.ceil: _act("ceil"), torch.round: _round,
    torch.square: _act("square"),
    torch.neg: _neg, operator.neg: _neg, torch.sign: _sign,
    F.leaky_relu: _leaky, F.elu: _alpha_act("elu"), F.celu: _alpha_act("celu"),
    F.gelu: _gelu, F.softplus: _softplus_fn, F.prelu: _prelu_fn,
    F.relu6: lambda imp, n, m, a, k, s: imp.b.act(_tensor(a[0]), "clip", s, {"min": 0.0, "max": 6.0}),
    F.hardtanh: _hardtanh, torch.clamp: _clamp, torch.clip: _clamp,
    torch.pow: _pow, operator.pow: _pow,
    torch.softmax: _softmax(False), F.softmax: _softmax(False),
    torch.log_softmax: _softmax(True), F.log_softmax: _softmax(True),
    F.dropout: _dropout, F.dropout1d: _dropout, F.dropout2d: _dropout, F.alpha_dropout: _dropout,
    torch.flatten: _same_as_torch, torch.reshape: _same_as_torch,
    torch.squeeze: _same_as_torch, torch.unsqueeze: _same_as_torch,
    torch.permute: _permute, torch.transpose: _transpose, torch.swapaxes: _transpose,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat, F.pad: _pad,
    torch.add: _arith("add"), operator.add: _arith("add"), operator.iadd: _arith("add"),
    torch.sub: _arith("sub"), operator.sub: _arith("sub"), operator.isub: _arith("sub"),
    torch.mul: _arith("mul"), operator.mul: _arith("mul"), operator.imul: _arith("mul"),
    torch.div: _arith("div"), torch.true_divide: _arith("div"), operator.truediv: _arith("div"),
    torch.matmul: _matmul, operator.matmul: _matmul, F.linear: _linear_fn, F.conv2d: _conv_fn,
    F.max_pool2d: _max_pool_fn, F.avg_pool2d: _avg_pool_fn,
    F.adaptive_avg_pool2d: _adaptive_fn("avgpool"), F.adaptive_max_pool2d: _adaptive_fn("maxpool"),
    torch.mean: _mean, F.batch_norm: _batch_norm_fn,
}

METHODS: dict[str, Handler] = {
    "relu": _act("relu"), "sigmoid": _act("sigmoid"), "tanh": _act("tanh"), "abs": _act("abs"),
    "exp": _act("exp"), "sqrt": _act("sqrt"), "reciprocal": _act("reciprocal"),
    "floor": _act("floor"), "ceil": _act("ceil"), "round": _round, "erf": _act("erf"),
    "square": _act("square"), "neg": _neg, "sign": _sign, "pow": _pow,
    "clamp": _clamp, "clip": _clamp,
    "softmax": _softmax(False), "log_softmax": _softmax(True),
    "view": _same_as_torch, "reshape": _same_as_torch, "flatten": _same_as_torch,
    "unflatten": _same_as_torch, "squeeze": _same_as_torch, "unsqueeze": _same_as_torch,
    "view_as": _same_as_torch, "reshape_as": _same_as_torch,
    "permute": _permute, "transpose": _transpose, "swapaxes": _transpose,
    "contiguous": _alias, "clone": _alias, "detach": _alias,
    "float": _dtype_alias, "to": _dtype_alias, "type_as": _dtype_alias, "double": _dtype_alias,
    "add": _arith("add"), "sub": _arith("sub"), "mul": _arith("mul"), "div": _arith("div"),
    "add_": _arith("add"), "sub_": _arith("sub"), "mul_": _arith("mul"), "div_": _arith("div"),
    "matmul": _matmul, "mean": _mean,
}


# ------------------------------------------------------------------------------ modules


def _m_input_quant(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    if x != imp.b.input:
        raise NodeProblem("InputQuant must be applied to the model's input, first")
    imp.b.nodes[0].attrs["bits"] = int(mod.bits)
    return x


def _m_linear(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    extra = {"w_bits": int(mod.w_bits)} if getattr(mod, "w_bits", None) is not None else {}
    return imp.b.gemm(_tensor(args[0]), _np(mod.weight), _np(mod.bias), src, **extra)


def _m_conv(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    if mod.padding_mode != "zeros":
        raise NodeProblem(f"padding_mode={mod.padding_mode!r} is not supported; use zero padding")
    extra = {"w_bits": int(mod.w_bits)} if getattr(mod, "w_bits", None) is not None else {}
    return _conv(imp, _tensor(args[0]), _np(mod.weight), _np(mod.bias), mod.stride, mod.padding,
                 mod.dilation, mod.groups, src, **extra)


def _m_batch_norm(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    if mod.running_mean is None or mod.running_var is None:
        raise NodeProblem("batch norm without running statistics normalises by the batch; use track_running_stats=True")
    c = mod.num_features
    gamma = _np(mod.weight) if mod.affine else np.ones(c)
    beta = _np(mod.bias) if mod.affine else np.zeros(c)
    return imp.b.batch_norm(_tensor(args[0]), gamma, beta, _np(mod.running_mean), _np(mod.running_var), mod.eps, src)


def _m_quant_relu(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    clip = float(mod.clip.detach().abs()) + 1e-3  # as QuantReLU.forward computes its bound
    return imp.b.act(_tensor(args[0]), "relu", src, bits=int(mod.bits), clip=clip)


def _m_sign(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    return imp.b.act(_tensor(args[0]), "sign", src, bits=1)


def _m_prelu(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    return imp.b.act(x, "prelu", src, {"slope": _prelu_slope(x, _np(mod.weight))})


def _m_call(f: Callable[[nn.Module, Tensor, GraphBuilder, str], Tensor]) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        return f(mod, _tensor(args[0]), imp.b, src)

    return handler


def _m_max_pool(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    if mod.return_indices:
        raise NodeProblem("max pooling indices are not supported")
    x = _tensor(args[0])
    attrs = _pool_attrs(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
    return imp.b.emit("maxpool", [x], attrs, src)


def _m_avg_pool(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    return _avg_pool(imp, _tensor(args[0]), mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                     mod.count_include_pad, mod.divisor_override, src)


def _m_adaptive(op: str) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        if getattr(mod, "return_indices", False):
            raise NodeProblem("max pooling indices are not supported")
        return _adaptive(imp, n, _tensor(args[0]), op, src)

    return handler


def _m_const_pad(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
    x = _tensor(args[0])
    return imp.b.pad_full(x, _torch_pads(x, list(mod.padding)), float(mod.value), src)


def _m_softmax(log: bool) -> Handler:
    def handler(imp: _FxImporter, n: fx.Node, mod: Any, args: list[Any], kw: dict[str, Any], src: str) -> Tensor:
        if mod.dim is None:
            raise NodeProblem("softmax needs an explicit dim")
        return imp.b.softmax(_tensor(args[0]), int(mod.dim), src, log=log)

    return handler


# Checked in order: Gravel's QAT subclasses before their torch bases.
_MODULES: list[tuple[type | tuple[type, ...], Handler]] = [
    (InputQuant, _m_input_quant),
    (QuantReLU, _m_quant_relu),
    (SignActivation, _m_sign),
    (nn.Linear, _m_linear),
    (nn.Conv2d, _m_conv),
    (nn.modules.batchnorm._BatchNorm, _m_batch_norm),
    (nn.ReLU, _act("relu")),
    (nn.LeakyReLU, _m_call(lambda m, x, b, s: b.act(x, "leaky_relu", s, {"alpha": float(m.negative_slope)}))),
    (nn.PReLU, _m_prelu),
    (nn.Sigmoid, _act("sigmoid")),
    (nn.Tanh, _act("tanh")),
    (nn.Hardsigmoid, _act("hard_sigmoid", alpha=1.0 / 6.0, beta=0.5)),
    (nn.Hardswish, _act("hard_swish")),
    (nn.GELU, _m_call(lambda m, x, b, s: b.act(x, "gelu_tanh" if m.approximate == "tanh" else "gelu", s))),
    (nn.ELU, _m_call(lambda m, x, b, s: b.act(x, "elu", s, {"alpha": float(m.alpha)}))),
    (nn.SELU, _act("selu")),
    (nn.CELU, _m_call(lambda m, x, b, s: b.act(x, "celu", s, {"alpha": float(m.alpha)}))),
    (nn.Softplus, _m_call(lambda m, x, b, s: _softplus(b, x, float(m.beta), s))),
    (nn.Softsign, _act("softsign")),
    (nn.SiLU, _act("silu")),
    (nn.Mish, _act("mish")),
    (nn.ReLU6, _act("clip", min=0.0, max=6.0)),
    (nn.Hardtanh, _m_call(lambda m, x, b, s: b.act(x, "clip", s, _clamp_to(m.min_val, m.max_val)))),
    (nn.Softmax, _m_softmax(False)),
    (nn.LogSoftmax, _m_softmax(True)),
    ((nn.Identity, nn.modules.dropout._DropoutNd), _alias),
    ((nn.Flatten, nn.Unflatten), _same_as_torch),
    (nn.MaxPool2d, _m_max_pool),
    (nn.AvgPool2d, _m_avg_pool),
    (nn.AdaptiveAvgPool2d, _m_adaptive("avgpool")),
    (nn.AdaptiveMaxPool2d, _m_adaptive("maxpool")),
    (nn.modules.padding._ConstantPadNd, _m_const_pad),
]


def module_handler(mod: nn.Module) -> Handler | None:
    for types, handler in _MODULES:
        if isinstance(mod, types):
            return handler
    return None

