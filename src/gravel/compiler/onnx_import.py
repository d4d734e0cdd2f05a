"""Read a float ONNX model as a chain of float operators (then quantized post-training).

ONNX files are parsed by the onnx package's protobuf reader, never unpickled. Unsupported
operators are refused up front with their op type and node name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gravel.compiler.ops import ActOp, BatchNormOp, ConvOp, FlattenOp, FloatOp, LinearOp, PoolOp
from gravel.errors import ModelError

__all__ = ["ops_from_onnx"]

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
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
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
