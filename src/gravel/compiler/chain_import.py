"""The chain importers that `load_model_ops` still uses (ONNX and torch models as a straight
chain of float operators, for the chain quantizer in ops.py / quantize.py / graph.py).

Superseded by the graph importers (`onnx_import.graph_from_onnx`, `torch_import.graph_from_torch`,
`importers.load_graph_model`); kept unchanged until the compiler switches to the graph IR.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from gravel.compiler.ops import (
    ActOp,
    BatchNormOp,
    ConvOp,
    FlattenOp,
    FloatOp,
    InputQuantOp,
    LinearOp,
    PoolOp,
)
from gravel.errors import ModelError
from gravel.model.quant import InputQuant, QuantReLU, SignActivation

__all__ = ["ops_from_onnx", "ops_from_torch"]

_SUPPORTED = "Gemm, MatMul(+Add), Conv, BatchNormalization, Relu, AveragePool, Flatten, Reshape"


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _one(values, what: str, name: str) -> int:
    values = list(values)
    if len(set(values)) > 1:
        raise ModelError(f"ONNX node '{name}': non-uniform {what} {values} is not supported")
    return int(values[0]) if values else 0


def ops_from_onnx(path: str | Path) -> list[FloatOp]:
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"]).astype(np.float64)
    inputs = [i.name for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one input, found {inputs}")
    current = inputs[0]
    ops: list[FloatOp] = []
    pending_matmul: LinearOp | None = None

    def weight(name: str, node) -> np.ndarray:
        if name not in consts:
            raise ModelError(f"ONNX node '{node.name}' ({node.op_type}): input {name} is not a constant weight")
        return consts[name]

    for node in graph.node:
        name = node.name or node.output[0]
        if node.op_type == "Constant":
            continue
        data_inputs = [i for i in node.input if i and i not in consts]
        if data_inputs != [current]:
            raise ModelError(f"ONNX node '{name}' ({node.op_type}) does not continue a single chain")
        current = node.output[0]
        a = _attrs(node)
        op: FloatOp | None = None
        if pending_matmul is not None and node.op_type != "Add":
            ops.append(pending_matmul)
            pending_matmul = None
        if node.op_type == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise ModelError(f"ONNX node '{name}' (Gemm): only transA=0, alpha=beta=1 are supported")
            w = weight(node.input[1], node)
            w = w if a.get("transB", 0) else w.T
            b = weight(node.input[2], node) if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0])
            op = LinearOp(w, b, None, name)
        elif node.op_type == "MatMul":
            w = weight(node.input[1], node).T
            pending_matmul = LinearOp(w, np.zeros(w.shape[0]), None, name)
            continue
        elif node.op_type == "Add" and pending_matmul is not None:
            pending_matmul.bias = weight(node.input[1], node).reshape(-1)
            op, pending_matmul = pending_matmul, None
        elif node.op_type == "Conv":
            if _one(a.get("dilations", [1]), "dilations", name) != 1 or a.get("group", 1) != 1:
                raise ModelError(f"ONNX node '{name}' (Conv): grouped or dilated convolution is not supported")
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ModelError(f"ONNX node '{name}' (Conv): auto_pad is not supported; export explicit pads")
            w = weight(node.input[1], node)
            b = weight(node.input[2], node) if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0])
            op = ConvOp(w, b, _one(a.get("strides", [1]), "strides", name), _one(a.get("pads", [0]), "pads", name), None, name)
        elif node.op_type == "BatchNormalization":
            g, beta, mean, var = (weight(i, node) for i in node.input[1:5])
            op = BatchNormOp(g, beta, mean, var, float(a.get("epsilon", 1e-5)), name)
        elif node.op_type == "Relu":
            op = ActOp("relu", None, None, name)
        elif node.op_type == "AveragePool":
            if _one(a.get("pads", [0]), "pads", name) != 0 or a.get("ceil_mode", 0):
                raise ModelError(f"ONNX node '{name}' (AveragePool): padding or ceil_mode is not supported")
            k = _one(a["kernel_shape"], "kernel_shape", name)
            op = PoolOp(k, _one(a.get("strides", [k]), "strides", name), name)
        elif node.op_type == "Flatten":
            if a.get("axis", 1) != 1:
                raise ModelError(f"ONNX node '{name}' (Flatten): only axis=1 is supported")
            op = FlattenOp(name)
        elif node.op_type == "Reshape":
            shape = consts.get(node.input[1])
            if shape is None or len(shape) != 2 or shape[1] != -1 and shape[0] not in (-1, 0, 1):
                raise ModelError(f"ONNX node '{name}' (Reshape): only a reshape to (batch, -1) is supported")
            op = FlattenOp(name)
        elif node.op_type in ("Identity", "Dropout"):
            continue
        else:
            raise ModelError(f"unsupported ONNX operator {node.op_type} at node '{name}'; supported: {_SUPPORTED}")
        ops.append(op)
    if pending_matmul is not None:
        ops.append(pending_matmul)
    return ops


_SKIP = (nn.Identity, nn.Dropout)


def _np(t: torch.Tensor | None, shape: int | None = None) -> np.ndarray:
    if t is None:
        return np.zeros(shape or 0)
    return t.detach().cpu().double().numpy().copy()


def _pair(v, what: str, name: str) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ModelError(f"layer '{name}': non-square {what} {v} is not supported")
        v = v[0]
    return int(v)


def _module_op(mod: nn.Module, name: str) -> FloatOp | None:
    if isinstance(mod, _SKIP):
        return None
    if isinstance(mod, InputQuant):
        return InputQuantOp(mod.bits, name)
    if isinstance(mod, nn.Linear):
        return LinearOp(_np(mod.weight), _np(mod.bias, mod.out_features), getattr(mod, "w_bits", None), name)
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1 or _pair(mod.dilation, "dilation", name) != 1:
            raise ModelError(f"layer '{name}': grouped or dilated Conv2d is not supported")
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise ModelError(f"layer '{name}': Conv2d padding must be given as zeros of fixed size")
        return ConvOp(
            _np(mod.weight),
            _np(mod.bias, mod.out_channels),
            _pair(mod.stride, "stride", name),
            _pair(mod.padding, "padding", name),
            getattr(mod, "w_bits", None),
            name,
        )
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if mod.running_mean is None:
            raise ModelError(f"layer '{name}': BatchNorm without running statistics")
        n = mod.num_features
        gamma = _np(mod.weight) if mod.affine else np.ones(n)
        beta = _np(mod.bias) if mod.affine else np.zeros(n)
        return BatchNormOp(gamma, beta, _np(mod.running_mean), _np(mod.running_var), mod.eps, name)
    if isinstance(mod, QuantReLU):
        return ActOp("relu", mod.bits, float(mod.clip.detach().abs()) + 1e-3, name)
    if isinstance(mod, SignActivation):
        return ActOp("sign", 1, None, name)
    if isinstance(mod, nn.ReLU):
        return ActOp("relu", None, None, name)
    if isinstance(mod, nn.AvgPool2d):
        k = _pair(mod.kernel_size, "kernel", name)
        s = _pair(mod.stride if mod.stride is not None else k, "stride", name)
        if _pair(mod.padding, "padding", name) != 0 or mod.ceil_mode:
            raise ModelError(f"layer '{name}': AvgPool2d with padding or ceil_mode is not supported")
        return PoolOp(k, s, name)
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise ModelError(f"layer '{name}': Flatten must flatten all but the batch dimension")
        return FlattenOp(name)
    raise ModelError(
        f"unsupported operator {type(mod).__name__} at layer '{name}'; supported: Linear, Conv2d, "
        "BatchNorm1d/2d, ReLU, AvgPool2d, Flatten and Gravel's quantized layers"
    )


def _function_op(node: fx.Node) -> FloatOp | None:
    target = node.target
    fname = getattr(target, "__name__", str(target))
    if target in (torch.relu, nn.functional.relu) or (node.op == "call_method" and target == "relu"):
        return ActOp("relu", None, None, node.name)
    if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start != 1:
            raise ModelError(f"operator flatten at '{node.name}': only flatten(x, 1) is supported")
        return FlattenOp(node.name)
    if node.op == "call_method" and target in ("view", "reshape"):
        if len(node.args) == 3 and node.args[2] == -1:
            return FlattenOp(node.name)
        raise ModelError(f"operator {target} at '{node.name}': only x.view(x.size(0), -1) is supported")
    if node.op == "call_method" and target == "size" or target is operator.getitem:
        return None
    raise ModelError(f"unsupported operator {fname} at '{node.name}'")


class _LeafTracer(fx.Tracer):
    """Keeps Gravel's quantizer modules whole instead of tracing into their STE arithmetic."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (InputQuant, QuantReLU, SignActivation, nn.Linear, nn.Conv2d)) or super().is_leaf_module(m, qualname)


def ops_from_torch(model: nn.Module) -> list[FloatOp]:
    """Trace `model` and return its operators in order; refuses branches and unknown ops."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:
        raise ModelError(f"cannot trace the model's forward with torch.fx: {exc}") from exc
    modules = dict(model.named_modules())
    ops: list[FloatOp] = []
    current: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise ModelError("models with more than one input are not supported")
            current = node
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            raise ModelError(f"operator get_attr at '{node.name}': parameters used outside a layer")
        op = _module_op(modules[node.target], node.target) if node.op == "call_module" else _function_op(node)
        if node.op == "call_method" and node.target == "size" or node.target is operator.getitem:
            continue
        if not node.args or node.args[0] is not current:
            raise ModelError(f"operator at '{node.name}' does not continue a single chain (branches are not supported)")
        current = node
        if op is not None:
            ops.append(op)
    return ops
