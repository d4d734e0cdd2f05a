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
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from gravel.compiler.graph_builder import Const, GraphBuilder, NodeProblem, Tensor
from gravel.compiler.ir import Graph
from gravel.compiler.onnx_ops import COMPARISON, FLOAT_TYPES, HANDLERS
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


_POISON = _Poison()


class _Importer:
    """One walk over an ONNX graph in its (topological) order: `env` maps each ONNX tensor
    name to a computed `Tensor`, a `Const`, or `_POISON` downstream of a reported node."""

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
        if tt.elem_type not in FLOAT_TYPES:
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
            self._node(node)
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

    def _node(self, node: Any) -> None:
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
        computed = [v for v in ins if isinstance(v, Tensor) or v is COMPARISON]
        try:
            if any(v is COMPARISON for v in ins) and node.op_type != "Where":
                raise NodeProblem("it reads a comparison of computed tensors, which Gravel does not support")
            if not computed:
                outs = self._fold(node, ins)
            else:
                handler = HANDLERS.get(node.op_type)
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
            msg = f"{node.op_type} with these inputs is not supported"
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
