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
import warnings
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from gravel.compiler.graph_builder import (
    BATCH_HYPOTHESES,
    Const,
    GraphBuilder,
    NodeProblem,
    Tensor,
)
from gravel.compiler.ir import Graph
from gravel.compiler.torch_ops import FUNCTIONS, METHODS, flat, module_handler
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
        if any(v is _POISON for v in flat(args) + flat(kwargs)):
            self.env[n.name] = _POISON
            return
        if n.op == "call_module":
            mod = modules[n.target]
            handler = module_handler(mod)
            what = f"layer '{n.target}' ({type(mod).__name__})"
            src = str(n.target)
        elif n.op == "call_function":
            handler, mod = FUNCTIONS.get(n.target), None
            what = f"'{n.name}' ({getattr(n.target, '__name__', n.target)})"
            src = n.name
        elif n.op == "call_method":
            handler, mod = METHODS.get(n.target), None
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
