"""Read a PyTorch module (plain float or with Gravel's QAT layers) as an IR `Graph`.

The module is traced with torch.fx, keeping Gravel's QAT layers, `nn.Linear` and `nn.Conv2d`
whole, and each traced call is mapped to IR nodes with the same builder as the ONNX importer.
The traced module also runs on the sample input's shape at two batch sizes: every value that
is not a tensor computed from the input (weights, `x.size(0)`, shapes) is taken from those runs,
and every mapped tensor's shape is checked against torch's.

QAT information becomes attributes the quantizer reads: the input node's `bits` (InputQuant),
an act relu's `bits` and `clip` (QuantReLU, the trained bound), an act sign's `bits` = 1
(SignActivation), and a gemm or conv's `w_bits` (QAT Linear and Conv2d; 1 means binarized: the
real weights are kept and the quantizer binarizes them).

Where fx cannot trace the model (data-dependent control flow) or meets a call Gravel does not
map, the model goes through an in-memory ONNX export (the TorchScript exporter) and
`graph_from_onnx` instead, and the graph's notes say so. A model with QAT layers never does:
an export would lose their bit widths.
"""

from __future__ import annotations

import inspect
import io
import operator
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from gravel.compiler.graph_builder import (
    BATCH_HYPOTHESES,
    Const,
    GraphBuilder,
    NodeProblem,
    Tensor,
    same_pads,
)
from gravel.compiler.ir import Graph
from gravel.errors import ModelError
from gravel.model.quant import InputQuant, QuantReLU, SignActivation

__all__ = ["graph_from_torch"]

_QAT = (InputQuant, QuantReLU, SignActivation)


class _Fallback(Exception):
    """torch.fx could not give a graph Gravel maps: go through an ONNX export instead."""


class _LeafTracer(fx.Tracer):
    """Keeps Gravel's QAT layers (and Linear and Conv2d, whose QAT subclasses fake-quantize
    their weights inside forward) whole instead of tracing into their arithmetic."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_QAT, nn.Linear, nn.Conv2d)) or super().is_leaf_module(m, qualname)


def graph_from_torch(module: nn.Module, sample_input: Any, name: str | None = None) -> Graph:
    """Import `module` as evaluated in eval() mode (its mode is restored afterwards).
    `sample_input` is a batch (tensor or array, batch axis first); its per-sample shape
    becomes the model's declared input shape."""
    if not isinstance(module, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    x = _sample(sample_input)
    name = name or type(module).__name__
    was_training = module.training
    module.eval()
    try:
        try:
            return _FxImporter(module, x).run(name)
        except _Fallback as why:
            reason = str(why)
        qat = [type(m).__name__ for m in module.modules() if isinstance(m, _QAT)]
        if qat:
            raise ModelError(
                f"{reason}; the model has Gravel QAT layers ({', '.join(sorted(set(qat)))}), whose "
                "bit widths an ONNX export would lose: make its forward traceable by torch.fx"
            )
        return _via_onnx(module, x, name, reason)
    finally:
        module.train(was_training)


def _sample(sample: Any) -> torch.Tensor:
    if isinstance(sample, np.ndarray):
        sample = torch.from_numpy(np.ascontiguousarray(sample))
    if not isinstance(sample, torch.Tensor):
        raise ModelError(f"the sample input must be a tensor or numpy array with a batch axis first, got {type(sample).__name__}")
    if sample.ndim < 2 or sample.shape[0] < 1 or 0 in sample.shape:
        raise ModelError(
            f"the sample input has shape {tuple(sample.shape)}; it needs a batch axis first and "
            "at least one per-sample axis, e.g. (1, 1, 28, 28) or (1, 784)"
        )
    return sample.detach().float()


def _via_onnx(module: nn.Module, x: torch.Tensor, name: str, reason: str) -> Graph:
    from gravel.compiler.onnx_import import graph_from_onnx

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(
                module, (x,), buf, dynamo=False, opset_version=18, input_names=["x"],
                output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
    except Exception as exc:  # the exporter raises many types
        raise ModelError(f"{reason}; the ONNX export Gravel falls back to failed too ({exc})") from exc
    try:
        graph = graph_from_onnx(buf.getvalue(), name=name)
    except ModelError as exc:
        raise ModelError(f"{reason}; through an ONNX export instead: {exc}") from exc
    graph.notes.append(f"imported through an in-memory ONNX export: {reason}")
    traced = sorted({str(w.message).split(". ")[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    if traced:
        graph.notes.append(
            "the export traced the path the sample input took, which may not hold for other inputs: "
            + "; ".join(traced)
        )
    return graph


# ------------------------------------------------------------------------------ tracing


class _Recorder(fx.Interpreter):
    """Runs the traced module and keeps, per node, the shape of each tensor computed from the
    input and the value of everything else."""

    def __init__(self, gm: fx.GraphModule, dependent: set[str]) -> None:
        super().__init__(gm)
        self.dependent = dependent
        self.record: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.dependent and isinstance(out, torch.Tensor):
            self.record[n.name] = torch.Size(out.shape)
        elif isinstance(out, torch.Tensor):
            self.record[n.name] = out.detach().cpu().numpy().copy()
        elif isinstance(out, (int, float, bool, tuple, list, torch.Size)) or out is None:
            self.record[n.name] = _plain(out)
        else:
            self.record[n.name] = out
        return out


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy().copy()
    if isinstance(v, (tuple, list, torch.Size)):
        return tuple(_plain(i) for i in v)
    return v


class _FxImporter:
    def __init__(self, module: nn.Module, x: torch.Tensor) -> None:
        self.module = module
        self.x = x
        self.problems: list[str] = []
        self.env: dict[str, Any] = {}
        self.b: GraphBuilder

    def _trace(self) -> fx.GraphModule:
        concrete: dict[str, Any] = {}
        try:
            params = list(inspect.signature(self.module.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        extra = [p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for p in extra:
            if p.default is p.empty:
                raise ModelError(
                    f"the model's forward takes more than one input ({', '.join(q.name for q in params)}); "
                    "Gravel models take exactly one input tensor"
                )
            concrete[p.name] = p.default
        try:
            tracer = _LeafTracer()
            graph = tracer.trace(self.module, concrete_args=concrete or None)
            return fx.GraphModule(tracer.root, graph)
        except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable code
            raise _Fallback(f"torch.fx cannot trace the model ({type(exc).__name__}: {exc})".split("\n")[0]) from None

    def _runs(self, gm: fx.GraphModule, dependent: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        records = []
        for n in BATCH_HYPOTHESES:
            xb = self.x[:1].expand(n, *self.x.shape[1:]).contiguous()
            rec = _Recorder(gm, dependent)
            try:
                with torch.no_grad():
                    rec.run(xb)
            except Exception as exc:  # the user's forward raises anything
                try:
                    with torch.no_grad():
                        self.module(self.x)
                except Exception as exc2:
                    raise ModelError(
                        f"the model fails on the sample input of shape {tuple(self.x.shape)}: {exc2}"
                    ) from exc2
                raise ModelError(
                    f"the model runs with a batch of {self.x.shape[0]} but not of {n} ({exc}); its "
                    "forward must not fix the batch size: use x.shape[0] or -1 for the batch axis"
                ) from exc
            records.append(rec.record)
        return records[0], records[1]

    def run(self, name: str) -> Graph:
        gm = self._trace()
        nodes = list(gm.graph.nodes)
        # fx turns arguments with defaults (concrete_args) into placeholders holding them
        placeholders = [n for n in nodes if n.op == "placeholder" and not n.args]
        if len(placeholders) != 1:
            raise ModelError("the model's forward takes more than one input; Gravel models take exactly one input tensor")
        dependent: set[str] = set()
        for n in nodes:
            if n in placeholders or any(i.name in dependent for i in n.all_input_nodes):
                dependent.add(n.name)
        r1, r2 = self._runs(gm, dependent)
        shapes = self._shape_values(nodes, dependent, r1)
        self.r1, self.r2 = r1, r2
        modules = dict(gm.named_modules())
        self.b = GraphBuilder(placeholders[0].name, tuple(self.x.shape[1:]), placeholders[0].name)
        out: Any = None
        for n in nodes:
            if n.op == "placeholder":
                self.env[n.name] = self.b.input if n in placeholders else Const.of(n.args[0])
            elif n.op == "output":
                out = self._resolve(n.args[0])
            elif n.name not in dependent or n.name in shapes:
                self.env[n.name] = Const(r1[n.name], r2[n.name])
            elif not isinstance(r1[n.name], torch.Size):
                self._data_value(n)
            else:
                self._map(n, modules)
        if self.problems:
            k = len(self.problems)
            raise ModelError(
                f"{k} operation{'s' if k > 1 else ''} of the model cannot be imported:\n"
                + "\n".join(f"  - {p}" for p in self.problems)
                + "\nSee 'Supported operators' in Gravel's README for what is imported."
            )
        if isinstance(out, (tuple, list)) and len(out) == 1:
            out = out[0]
        if not isinstance(out, Tensor):
            raise ModelError("the model's output must be one tensor computed from its input")
        return self.b.finish(out, name)

    @staticmethod
    def _shape_values(nodes: list[fx.Node], dependent: set[str], r1: dict[str, Any]) -> set[str]:
        """Nodes whose value depends on the input's shape but not its data: x.size(),
        x.shape, x.dim() and arithmetic or indexing on those."""
        queries = {"size", "dim", "numel", "ndimension"}
        out: set[str] = set()
        for n in nodes:
            if n.name not in dependent or n.op == "placeholder" or isinstance(r1.get(n.name), torch.Size):
                continue
            tensor_inputs = [i for i in n.all_input_nodes if i.name in dependent and i.name not in out]
            query = (n.op == "call_method" and n.target in queries) or (
                n.op == "call_function" and n.target is getattr and len(n.args) > 1
                and n.args[1] in ("shape", "ndim", "dtype", "device")
            )
            if (query and len(tensor_inputs) == 1 and tensor_inputs[0] is n.args[0]) or not tensor_inputs:
                out.add(n.name)
        return out

    def _data_value(self, n: fx.Node) -> None:
        """A non-tensor value computed from the input's data: chunk/split results Gravel does
        not map (the ONNX route may), or Python numbers (item(), tolist()) that would be
        frozen at import."""
        if n.op == "call_method" and n.target in ("item", "tolist", "__bool__", "__len__"):
            self.problems.append(
                f"'{n.name}' (Tensor.{n.target}) turns data into a Python value, which would be "
                "frozen at import; keep the computation on tensors"
            )
            self.env[n.name] = _POISON
            return
        raise _Fallback(f"Gravel does not map '{n.name}' ({getattr(n.target, '__name__', n.target)})")

    def _resolve(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env[n.name])

    def _map(self, n: fx.Node, modules: dict[str, nn.Module]) -> None:
        args, kwargs = self._resolve(n.args), self._resolve(n.kwargs)
        if any(v is _POISON for v in _flat(args) + _flat(kwargs)):
            self.env[n.name] = _POISON
            return
        if n.op == "call_module":
            mod = modules[n.target]
            handler = _module_handler(mod)
            what = f"layer '{n.target}' ({type(mod).__name__})"
            src = str(n.target)
        elif n.op == "call_function":
            handler, mod = _FUNCTIONS.get(n.target), None
            what = f"'{n.name}' ({getattr(n.target, '__name__', n.target)})"
            src = n.name
        elif n.op == "call_method":
            handler, mod = _METHODS.get(n.target), None
            what = f"'{n.name}' (Tensor.{n.target})"
            src = n.name
        else:  # pragma: no cover - fx has no other op producing a computed tensor
            handler, mod, what, src = None, None, n.name, n.name
        if handler is None:
            raise _Fallback(f"Gravel does not map {what}")
        s1, s2 = self.r1[n.name], self.r2[n.name]
        batch_first = s1[0] == BATCH_HYPOTHESES[0] and s2[0] == BATCH_HYPOTHESES[1] and s1[1:] == s2[1:]
        try:
            if not batch_first:
                raise NodeProblem(
                    f"its output (shape {tuple(s1)} for a batch of {BATCH_HYPOTHESES[0]}) does not "
                    "keep the batch axis first; Gravel computes one sample at a time"
                )
            y = handler(self, n, mod, list(args), dict(kwargs), src)
            self._check_shape(n, y)
        except NodeProblem as exc:
            self.problems.append(f"{what}: {exc}")
            # Go on with a stand-in of the shape torch computed, so that later operations are
            # checked too and every problem is reported at once (no graph is returned).
            self.env[n.name] = Tensor(f"<not imported: {n.name}>", tuple(s1[1:])) if batch_first else _POISON
            return
        self.env[n.name] = y

    def _check_shape(self, n: fx.Node, y: Any) -> None:
        s1 = self.r1[n.name]
        if not isinstance(y, Tensor) or y.shape != tuple(s1[1:]):  # pragma: no cover - mapping bug
            got = y.shape if isinstance(y, Tensor) else type(y).__name__
            raise NodeProblem(f"imported with per-sample shape {got}, torch computes {tuple(s1[1:])}")

    def out_shape(self, n: fx.Node) -> tuple[int, ...]:
        """Per-sample shape torch computes for node `n`."""
        return tuple(self.r1[n.name][1:])


class _PoisonType:
    """The output of an operation that could not be imported."""


_POISON = _PoisonType()


def _flat(v: Any) -> list[Any]:
    if isinstance(v, (tuple, list)):
        return [i for e in v for i in _flat(e)]
    if isinstance(v, dict):
        return [i for e in v.values() for i in _flat(e)]
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

Handler = Callable[[_FxImporter, fx.Node, Any, list[Any], dict[str, Any], str], Any]


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
    dtypes = [a for a in _flat(args[1:]) + _flat(kw) if isinstance(a, torch.dtype)]
    if any(not d.is_floating_point for d in dtypes):
        raise NodeProblem("a cast of a computed tensor to a non-float type is not supported")
    return _tensor(args[0])


_FUNCTIONS: dict[Any, Handler] = {
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

_METHODS: dict[str, Handler] = {
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


def _module_handler(mod: nn.Module) -> Handler | None:
    for types, handler in _MODULES:
        if isinstance(mod, types):
            return handler
    return None

