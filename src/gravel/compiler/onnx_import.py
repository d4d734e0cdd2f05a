"""Read an ONNX model (opsets 13 to 21, either of torch's exporters) as an IR `Graph`.

Files are parsed by the onnx package's protobuf reader, never unpickled. Weights stored in
external data files (the dynamo exporter's `<model>.onnx.data`) are read from beside the model,
and only from there: a location that leaves the model's directory is refused.

The declared input shape is the contract: one batch axis first (symbolic, or 1) and fixed
per-sample dimensions. Shape arithmetic on constants and on shapes (which are static apart
from the batch size) is evaluated at import with the onnx package's numpy reference
implementation. Every node that cannot be imported is collected, and one `ModelError` lists
them all with what to do. `SUPPORTED_OPERATORS` is the table of what is imported and how; the
README's "Supported operators" section is generated from it (`operator_table_markdown`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

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

__all__ = [
    "FOLDED_OPERATORS",
    "MAX_OPSET",
    "MIN_OPSET",
    "SUPPORTED_OPERATORS",
    "graph_from_onnx",
    "operator_table_markdown",
]

MIN_OPSET, MAX_OPSET = 13, 21

# ONNX operator -> how it is imported (on tensors computed from the model's input).
SUPPORTED_OPERATORS: dict[str, str] = {
    "Abs": "act abs",
    "Add": "with a constant: affine (a bias after MatMul folds into the gemm); two computed tensors: add",
    "AveragePool": "avgpool, 2-D; pads, auto_pad, ceil_mode, count_include_pad, dilations",
    "BatchNormalization": "affine with per-channel constants (inference mode)",
    "Cast": "to a float type: dropped",
    "CastLike": "to a float type: dropped (a constant cast like a computed tensor: evaluated)",
    "Ceil": "act ceil",
    "Celu": "act celu",
    "Clip": "act clip; bounds from constant inputs or attributes (ReLU6 is Clip(0, 6))",
    "Concat": "concat of computed tensors on a per-sample axis",
    "Constant": "evaluated at import",
    "ConstantOfShape": "evaluated at import",
    "Conv": "conv, 2-D; strides, pads, auto_pad, dilations, groups (depthwise included)",
    "Div": "by a constant: affine; a constant by a tensor: act reciprocal then affine; x / f(x) with f elementwise (Softsign's pattern): mul by act reciprocal",
    "Dropout": "dropped (inference)",
    "Elu": "act elu",
    "Erf": "act erf (the exporters' Gelu pattern x*0.5*(1+erf(x/sqrt 2)) imports node by node)",
    "Exp": "act exp",
    "Expand": "on a computed tensor only where it changes nothing",
    "Flatten": "reshape; axis 1 only (the batch axis stays first)",
    "Floor": "act floor",
    "Gelu": "act gelu or gelu_tanh (approximate='tanh')",
    "Gemm": "gemm; transB, alpha and beta fold into the weight and bias",
    "Greater": "only inside torch's Softplus threshold pattern (see Where)",
    "GlobalAveragePool": "avgpool with the whole (H, W) window",
    "GlobalMaxPool": "maxpool with the whole (H, W) window",
    "HardSigmoid": "act hard_sigmoid",
    "HardSwish": "act hard_swish",
    "Identity": "dropped",
    "LeakyRelu": "act leaky_relu",
    "LogSoftmax": "softmax (same argmax; dropped when final)",
    "MatMul": "with a constant matrix on either side: gemm (transposed for W @ x)",
    "Max": "of a tensor and constant scalars: act clip",
    "MaxPool": "maxpool, 2-D; pads, auto_pad, ceil_mode, dilations",
    "Min": "of a tensor and constant scalars: act clip",
    "Mish": "act mish",
    "Mul": "by a constant: affine; two computed tensors (x*x included): mul",
    "Neg": "affine with scale -1",
    "Pad": "constant mode only, per-sample axes",
    "Pow": "constant exponent: act pow (square for 2)",
    "PRelu": "act prelu, constant slope (per channel or shared)",
    "Reciprocal": "act reciprocal",
    "ReduceMax": "over (H, W) of a (C, H, W) tensor: maxpool",
    "ReduceMean": "over (H, W) of a (C, H, W) tensor: avgpool (global average pooling)",
    "ReduceSum": "over (H, W) of a (C, H, W) tensor: avgpool and affine",
    "Relu": "act relu",
    "Reshape": "reshape; constant target, 0 and -1 resolved, the batch axis stays first",
    "Round": "act round (half to even)",
    "Selu": "act selu",
    "Shape": "of a computed tensor: its static shape, evaluated at import",
    "Sigmoid": "act sigmoid",
    "Sign": "act sign, exact at 0: (sign(x) - sign(-x)) / 2",
    "Size": "of a computed tensor: evaluated at import",
    "Softmax": "softmax (dropped when final)",
    "Softplus": "act softplus",
    "Softsign": "act softsign",
    "Sqrt": "act sqrt",
    "Squeeze": "reshape; axes from the attribute or the input",
    "Sub": "with a constant: affine; two computed tensors: sub",
    "Sum": "add of computed tensors, constants as an affine shift",
    "Tanh": "act tanh",
    "Transpose": "transpose of per-sample axes (the batch axis stays first)",
    "Unsqueeze": "reshape; axes from the attribute or the input",
    "Where": "only torch's Softplus threshold pattern (dropped: softplus itself)",
}

# Operators imported only where every input is a constant or a shape: evaluated at import.
FOLDED_OPERATORS = (
    "Constant", "ConstantOfShape", "Shape", "Size", "Gather", "GatherElements", "Slice", "Split",
    "Cast", "CastLike", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Range", "Expand", "Equal",
    "Where", "Tile", "ReduceProd", "and any other operator on constants",
)

_FLOAT_TYPES = {1, 10, 11, 16}  # float, float16, double, bfloat16

# What to do about common operators Gravel does not import.
_ADVICE: dict[str, str] = {
    "LayerNormalization": "normalisation by a sample's own statistics is not a univariate function; use BatchNorm, which folds into an affine map",
    "InstanceNormalization": "normalisation by a sample's own statistics is not a univariate function; use BatchNorm",
    "GroupNormalization": "normalisation by a sample's own statistics is not a univariate function; use BatchNorm",
    "Resize": "upsampling (Upsample, interpolate) is not supported",
    "Upsample": "upsampling (Upsample, interpolate) is not supported",
    "ConvTranspose": "transposed convolution is not supported; use Conv",
    "Slice": "slicing a computed tensor is not supported; slice the input before the model",
    "Gather": "indexing a computed tensor is not supported",
    "Split": "splitting a computed tensor is not supported; use separate layers instead",
    "LSTM": "recurrent layers are not supported",
    "GRU": "recurrent layers are not supported",
    "RNN": "recurrent layers are not supported",
    "Einsum": "write it as MatMul with a constant weight",
    "ArgMax": "leave the final argmax to the client (drop it from the model)",
}


def operator_table_markdown() -> str:
    """The supported-operator table as Markdown: the README's section is this text."""
    lines = ["| ONNX operator | imported as |", "| --- | --- |"]
    for op in sorted(SUPPORTED_OPERATORS, key=str.lower):
        lines.append(f"| {op} | {SUPPORTED_OPERATORS[op]} |")
    lines.append("")
    lines.append(
        f"ONNX opsets {MIN_OPSET} to {MAX_OPSET} (others are converted where the onnx package can). "
        "Where every input of a node is a constant or a shape, the node is evaluated at import, "
        "whatever its type (" + ", ".join(FOLDED_OPERATORS) + ")."
    )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ loading


def graph_from_onnx(model: Any, name: str | None = None) -> Graph:
    """Import an ONNX model: a path (external data is read from beside it), the bytes of a
    model, or an `onnx.ModelProto`. Raises ModelError naming every node it cannot import."""
    proto, where, base_dir = _load(model)
    proto, opset, note = _normalise_opset(proto, where)
    name = name or (Path(where).stem if base_dir is not None else None) or proto.graph.name or "model"
    graph = _Importer(proto, where, opset).run(name)
    if note:
        graph.notes.insert(0, note)
    return graph


def _load(model: Any) -> tuple[Any, str, Path | None]:
    import onnx

    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where, base, data = proto.graph.name or "<ModelProto>", None, None
    elif isinstance(model, (bytes, bytearray, memoryview)):
        where, base, data = "<ONNX bytes>", None, bytes(model)
    elif isinstance(model, (str, Path)):
        path = Path(model)
        where, base = str(path), path.parent
        if not path.is_file():
            raise ModelError(f"{path}: no such ONNX file")
        data = path.read_bytes()
    else:
        raise ModelError(f"expected an ONNX file path, bytes or onnx.ModelProto, got {type(model).__name__}")
    if data is not None:
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception as exc:
            raise ModelError(f"{where}: not a readable ONNX model, truncated or corrupt ({exc})") from exc
        if not proto.graph.node and not proto.graph.input:
            raise ModelError(f"{where}: not an ONNX model (no graph in it); is the file truncated?")
    _load_external_data(proto, where, base)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"{where}: not a valid ONNX model, truncated or corrupt ({exc})") from exc
    return proto, where, base


def _all_tensors(graph: Any):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _load_external_data(proto: Any, where: str, base: Path | None) -> None:
    """Read external tensor data into the model, from files inside the model's directory only."""
    import onnx

    for t in _all_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if base is None:
            raise ModelError(
                f"{where}: tensor {t.name!r} keeps its data in an external file ({location!r}); "
                "pass the model's path so the data is read from beside it"
            )
        if not location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute() \
                or PureWindowsPath(location).drive:
            raise ModelError(
                f"{where}: tensor {t.name!r} has external data at {location!r}, not a path relative "
                "to the model's directory; refusing to read it (keep the .data file beside the model)"
            )
        root = base.resolve()
        target = (root / location).resolve()
        if target == root or root not in target.parents:
            raise ModelError(
                f"{where}: tensor {t.name!r} has external data at {location!r}, outside the "
                f"model's directory {root}; refusing to read it (keep the .data file beside the model)"
            )
        if not target.is_file():
            raise ModelError(f"{where}: tensor {t.name!r} needs external data file {target}, which is missing")
        offset = int(info.get("offset", 0) or 0)
        size = target.stat().st_size
        expected = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        length = int(info["length"]) if info.get("length") else size - offset
        if offset < 0 or length != expected or offset + length > size:
            raise ModelError(
                f"{where}: external data file {target} is truncated or does not match tensor "
                f"{t.name!r} ({expected} bytes needed at offset {offset}, file has {size}); "
                "export the model again"
            )
        with target.open("rb") as f:
            f.seek(offset)
            t.raw_data = f.read(length)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT


def _normalise_opset(proto: Any, where: str) -> tuple[Any, int, str]:
    """Inline local functions; bring an opset outside 13..21 into range where the onnx
    package's converter can, else refuse."""

    if len(proto.functions):
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ModelError(f"{where}: declares no ONNX opset; the file may be truncated; export it again")
    opset = versions[0]
    if MIN_OPSET <= opset <= MAX_OPSET:
        return proto, opset, ""
    target = MIN_OPSET if opset < MIN_OPSET else MAX_OPSET
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(proto, target)
    except Exception as exc:
        raise ModelError(
            f"{where}: ONNX opset {opset} is outside the supported {MIN_OPSET} to {MAX_OPSET} and "
            f"could not be converted ({exc}); export with opset_version={min(max(opset, MIN_OPSET), MAX_OPSET)}"
        ) from exc
    return converted, target, f"converted from ONNX opset {opset} to {target}"


# ------------------------------------------------------------------------------ import


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


class _Poison:
    """The output of a node that could not be imported: nodes reading it are skipped."""


class _Comparison:
    """A comparison of a computed tensor, which only torch's Softplus pattern may read."""


_POISON = _Poison()
_COMPARISON = _Comparison()
Value = Tensor | Const | None


class _Importer:
    def __init__(self, proto: Any, where: str, opset: int) -> None:
        self.proto = proto
        self.graph = proto.graph
        self.where = where
        self.opset = opset
        self.env: dict[str, Any] = {}
        self.problems: list[str] = []
        self.consumers: dict[str, int] = {}
        for node in self.graph.node:
            for i in node.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        for o in self.graph.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1
        self.from_matmul: set[str] = set()  # gemms from a MatMul, with a bias slot still free
        self.b: GraphBuilder

    # -------------------------------------------------------------------- the contract

    def _input(self) -> tuple[str, tuple[int, ...], bool]:
        init = {t.name for t in self.graph.initializer} | {t.values.name for t in self.graph.sparse_initializer}
        inputs = [i for i in self.graph.input if i.name not in init]
        if len(inputs) != 1:
            names = ", ".join(repr(i.name) for i in inputs) or "none"
            raise ModelError(
                f"{self.where}: the model has {len(inputs)} inputs ({names}); Gravel models take "
                "exactly one input tensor: export a model with a single input"
            )
        inp = inputs[0]
        tt = inp.type.tensor_type if inp.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            raise ModelError(
                f"{self.where}: input {inp.name!r} declares no tensor shape; export with a fixed "
                "input shape (a symbolic batch axis is fine)"
            )
        if tt.elem_type not in _FLOAT_TYPES:
            raise ModelError(f"{self.where}: input {inp.name!r} is not a float tensor; Gravel models take float inputs")
        dims = list(tt.shape.dim)
        if len(dims) < 2:
            raise ModelError(
                f"{self.where}: input {inp.name!r} has rank {len(dims)}; Gravel expects a batch "
                "axis first and at least one per-sample axis"
            )
        first = dims[0]
        fixed = first.HasField("dim_value")
        if fixed and first.dim_value != 1:
            raise ModelError(
                f"{self.where}: input {inp.name!r} has a fixed batch of {first.dim_value}; export "
                "with a batch of 1 or a symbolic batch axis (dynamic_axes={'x': {0: 'batch'}})"
            )
        shape = []
        for k, d in enumerate(dims[1:], start=1):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                what = d.dim_param or "unknown"
                raise ModelError(
                    f"{self.where}: input {inp.name!r} has a dynamic dimension {k} ({what}); "
                    "Gravel needs fixed per-sample dimensions: export with a fixed input shape "
                    "(a symbolic batch axis, axis 0, is fine)"
                )
            shape.append(d.dim_value)
        return inp.name, tuple(shape), fixed

    def run(self, name: str) -> Graph:
        import onnx
        from onnx import numpy_helper

        if len(self.graph.output) != 1:
            raise ModelError(
                f"{self.where}: the model has {len(self.graph.output)} outputs; Gravel models have "
                "exactly one (the class scores)"
            )
        input_name, shape, fixed = self._input()
        self.b = GraphBuilder(input_name, shape, input_name, batch_fixed=fixed)
        self.env[input_name] = self.b.input
        for t in self.graph.initializer:
            self.env[t.name] = Const.of(numpy_helper.to_array(t))
        for node in self.graph.node:
            self._node(node, onnx)
        out_name = self.graph.output[0].name
        out = self.env.get(out_name)
        if self.problems:
            n = len(self.problems)
            raise ModelError(
                f"{self.where}: {n} node{'s' if n > 1 else ''} cannot be imported:\n"
                + "\n".join(f"  - {p}" for p in self.problems)
                + "\nSee 'Supported operators' in Gravel's README for what is imported."
            )
        if not isinstance(out, Tensor):
            raise ModelError(f"{self.where}: the output {out_name!r} does not depend on the input")
        return self.b.finish(out, name)

    # -------------------------------------------------------------------- one node

    def _problem(self, node: Any, msg: str) -> None:
        self.problems.append(f"{node.op_type} '{node.name or node.output[0]}': {msg}")
        for o in node.output:
            self.env[o] = _POISON

    def _node(self, node: Any, onnx: Any) -> None:
        label = node.name or (node.output[0] if node.output else node.op_type)
        ins: list[Any] = []
        for i in node.input:
            if not i:
                ins.append(None)
            elif i not in self.env:
                self._problem(node, f"reads {i!r}, which no earlier node or initializer defines (is the file truncated?)")
                return
            else:
                ins.append(self.env[i])
        known = node.domain in ("", "ai.onnx")
        if any(v is _POISON for v in ins):
            # downstream of a node already reported: report it too only if unsupported anyway
            if not known or node.op_type not in SUPPORTED_OPERATORS:
                self._unsupported(node)
            else:
                for o in node.output:
                    self.env[o] = _POISON
            return
        if not known:
            self._unsupported(node)
            return
        computed = [v for v in ins if isinstance(v, (Tensor, _Comparison))]
        try:
            if any(isinstance(v, _Comparison) for v in ins) and node.op_type != "Where":
                raise NodeProblem("it reads a comparison of computed tensors, which Gravel does not support")
            if not computed:
                outs = self._fold(node, ins)
            else:
                handler = _HANDLERS.get(node.op_type)
                if handler is None:
                    self._unsupported(node)
                    return
                outs = handler(self, node, ins, _attrs(node), label)
                if not isinstance(outs, list):
                    outs = [outs]
                for k, o in enumerate(node.output[len(outs):], start=len(outs)):
                    if o and self.consumers.get(o):
                        raise NodeProblem(f"its output {k} ({o!r}) is used; Gravel only imports output 0 of {node.op_type}")
        except NodeProblem as exc:
            self._problem(node, str(exc))
            return
        for o, v in zip(node.output, outs):
            if o:
                self.env[o] = v

    def _unsupported(self, node: Any) -> None:
        if node.domain not in ("", "ai.onnx"):
            msg = f"operator of domain {node.domain!r} is not standard ONNX; export with standard operators only"
        elif node.op_type in SUPPORTED_OPERATORS:
            msg = "not supported here"
        else:
            msg = f"Gravel does not import {node.op_type} on computed tensors; " + _ADVICE.get(
                node.op_type, "replace it with a supported operator"
            )
        self._problem(node, msg)

    def _fold(self, node: Any, ins: list[Any]) -> list[Const]:
        """Evaluate a node whose inputs are all known, under both batch hypotheses."""
        from onnx.reference import ReferenceEvaluator

        try:
            ev = ReferenceEvaluator(node, opsets={"": self.opset})
            runs = []
            for k in (0, 1):
                feeds = {n: np.asarray(v.a if k == 0 else v.b) for n, v in zip(node.input, ins) if n}
                runs.append(ev.run(None, feeds))
                if not any(isinstance(v, Const) and v.varies for v in ins):
                    runs.append(runs[0])
                    break
        except Exception as exc:  # noqa: BLE001 - the reference ops raise anything
            raise NodeProblem(f"could not evaluate it on its constant inputs ({exc})") from None
        return [Const(a, b) for a, b in zip(runs[0], runs[1])]

    # -------------------------------------------------------------------- helpers

    def tensor(self, v: Any, what: str = "input") -> Tensor:
        if not isinstance(v, Tensor):
            raise NodeProblem(f"its {what} must be computed from the model's input")
        return v

    def const(self, v: Any, what: str) -> Const:
        if not isinstance(v, Const):
            raise NodeProblem(f"{what} must be a constant (an initializer), not computed from the input")
        return v

    def ints(self, v: Any, what: str) -> list[int]:
        return [int(i) for i in np.asarray(self.const(v, what).value(what)).reshape(-1)]

    def scalar(self, v: Any, what: str) -> float:
        arr = np.asarray(self.const(v, what).value(what), dtype=np.float64)
        if arr.size == 0 or not np.all(arr == arr.reshape(-1)[0]):
            raise NodeProblem(f"{what} must be one number, got shape {arr.shape}")
        return float(arr.reshape(-1)[0])


# ------------------------------------------------------------------------------ handlers

Handler = Callable[[_Importer, Any, list[Any], dict[str, Any], str], Any]
_HANDLERS: dict[str, Handler] = {}


def _handles(*ops: str) -> Callable[[Handler], Handler]:
    def register(f: Handler) -> Handler:
        for op in ops:
            _HANDLERS[op] = f
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
        ok = int(a.get("to", 0)) in _FLOAT_TYPES
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
    return _COMPARISON
