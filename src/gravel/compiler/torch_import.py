"""Read a PyTorch module (QAT or plain float) as a chain of float operators.

The module is traced with torch.fx, so any module whose forward is a straight chain of supported
layers works, not only nn.Sequential. Anything else is refused before quantization starts, with
the operator's name and the layer it came from.
"""

from __future__ import annotations

import operator

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

__all__ = ["ops_from_torch"]

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
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0 if target is torch.flatten else 0)
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
    except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable code
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
