"""`gt.nn.from_pytorch(model, sample)`: a PyTorch model as a module that runs on encrypted tensors.

Supported layers: Linear, Conv2d (groups 1, no dilation), AvgPool2d (no padding), BatchNorm1d/2d
(folded into the Linear or Conv2d before it; otherwise a per-channel affine map, one level),
Flatten, Identity/Dropout (inference), and polynomial activations (`PolyActivation`, a square).
ReLU, Sigmoid, Tanh, GELU, SiLU have no exact CKKS form: `replace_activations` swaps them for
polynomial fits on a range, or train with `PolyActivation` in place.

The module knows, before any key exists, the depth it needs and the rotation steps its linear
maps use (a dry run, gravel.tensor._trace), so `module.context()` makes keys with only those
Galois keys. `module.check(ctx, sample)` reports the error of the encrypted run against the float
model.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gravel.ckks.params import choose_params
from gravel.errors import InputError, ModelError
from gravel.tensor import approx as _approx
from gravel.tensor.context import Context, _TensorContext
from gravel.tensor.tensor import EncryptedTensor

__all__ = ["EncryptedModule", "PolyActivation", "Report", "from_pytorch", "replace_activations"]


class PolyActivation(torch.nn.Module):
    """An activation that is a polynomial (coefficients from the constant term up): trainable
    around in PyTorch, evaluated exactly by CKKS."""

    def __init__(self, coeffs: Sequence[float]) -> None:
        super().__init__()
        if len(coeffs) < 2:
            raise InputError("PolyActivation needs a polynomial of degree >= 1")
        self.register_buffer("coeffs", torch.tensor([float(c) for c in coeffs], dtype=torch.float64))

    @classmethod
    def square(cls) -> PolyActivation:
        return cls([0.0, 0.0, 1.0])

    @classmethod
    def fit(cls, name: str, low: float, high: float, degree: int) -> PolyActivation:
        """A fit of relu, sigmoid or tanh on [low, high] (gravel.tensor.approx)."""
        fns = {"relu": _approx.relu, "sigmoid": _approx.sigmoid, "tanh": _approx.tanh}
        if name not in fns:
            raise InputError(f"no polynomial fit for {name!r}; choose one of {sorted(fns)}")
        return cls(fns[name](low, high, degree).coeffs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coeffs.to(x.dtype)
        out = torch.zeros_like(x) + c[-1]
        for k in range(len(c) - 2, -1, -1):
            out = out * x + c[k]
        return out

    def extra_repr(self) -> str:
        return "coeffs=" + ", ".join(f"{float(c):.4g}" for c in self.coeffs)


_REPLACEABLE = {torch.nn.ReLU: "relu", torch.nn.Sigmoid: "sigmoid", torch.nn.Tanh: "tanh",
                torch.nn.GELU: "relu", torch.nn.SiLU: "relu"}


def replace_activations(model: torch.nn.Module, low: float = -4.0, high: float = 4.0,
                        degree: int = 2) -> torch.nn.Module:
    """A copy of `model` with ReLU/GELU/SiLU (as ReLU), Sigmoid and Tanh replaced by polynomial
    fits on [low, high]. Accuracy drops where activations leave the range: check, or fine-tune
    the copy with the polynomials in place."""
    model = copy.deepcopy(model)

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            kind = next((v for k, v in _REPLACEABLE.items() if isinstance(child, k)), None)
            if kind is not None:
                setattr(module, name, PolyActivation.fit(kind, low, high, degree))
            else:
                swap(child)

    swap(model)
    return model


# -- steps of an encrypted module -------------------------------------------------------------
class _Step:
    name: str

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        raise NotImplementedError


@dataclass
class _Affine(_Step):
    weight: np.ndarray  # (in, out)
    bias: np.ndarray | None
    name: str = "Linear"

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        out = x.double() @ torch.from_numpy(self.weight)
        return out + torch.from_numpy(self.bias) if self.bias is not None else out

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        out = x @ self.weight
        return out + self.bias if self.bias is not None else out


@dataclass
class _Conv(_Step):
    kernel: np.ndarray
    bias: np.ndarray | None
    stride: int
    padding: int
    name: str = "Conv2d"

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        b = torch.from_numpy(self.bias) if self.bias is not None else None
        return torch.nn.functional.conv2d(x.double(), torch.from_numpy(self.kernel), b,
                                          stride=self.stride, padding=self.padding)

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.conv2d(self.kernel, self.bias, self.stride, self.padding)


@dataclass
class _Pool(_Step):
    kernel_size: int
    stride: int
    name: str = "AvgPool2d"

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, self.kernel_size, self.stride)

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.avg_pool2d(self.kernel_size, self.stride)


@dataclass
class _Flatten(_Step):
    start_dim: int
    end_dim: int
    name: str = "Flatten"

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, self.start_dim, self.end_dim)

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.flatten(self.start_dim, self.end_dim)


@dataclass
class _Poly(_Step):
    coeffs: tuple[float, ...]
    name: str = "PolyActivation"

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x) + self.coeffs[-1]
        for c in reversed(self.coeffs[:-1]):
            out = out * x + c
        return out

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        return x.polyval(self.coeffs)


@dataclass
class _ChannelAffine(_Step):
    scale: np.ndarray  # broadcastable to a sample's shape (without batch)
    shift: np.ndarray
    name: str = "BatchNorm"

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.from_numpy(self.scale) + torch.from_numpy(self.shift)

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        return x * self.scale + self.shift


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().to(torch.float64).numpy().copy()


def _single(value: Any, what: str, layer: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ModelError(f"{layer}: {what} {value} differs by axis; only square {what}s are supported")
        value = value[0]
    return int(value)


def _bn_affine(bn: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return _np(scale), _np(beta - bn.running_mean * scale)


def _convert(module: torch.nn.Module, where: str) -> _Step | None:
    nn = torch.nn
    if isinstance(module, nn.Linear):
        return _Affine(_np(module.weight).T.copy(), _np(module.bias), f"{where} Linear")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or _single(module.dilation, "dilation", where) != 1:
            raise ModelError(f"{where}: Conv2d with groups or dilation is not supported")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ModelError(f"{where}: Conv2d padding must be a number with zeros padding")
        return _Conv(_np(module.weight), _np(module.bias), _single(module.stride, "stride", where),
                     _single(module.padding, "padding", where), f"{where} Conv2d")
    if isinstance(module, nn.AvgPool2d):
        if _single(module.padding, "padding", where) != 0 or module.ceil_mode:
            raise ModelError(f"{where}: AvgPool2d with padding or ceil_mode is not supported")
        k = _single(module.kernel_size, "kernel_size", where)
        s = _single(module.stride if module.stride is not None else k, "stride", where)
        return _Pool(k, s, f"{where} AvgPool2d")
    if isinstance(module, nn.Flatten):
        return _Flatten(module.start_dim, module.end_dim, f"{where} Flatten")
    if isinstance(module, PolyActivation):
        return _Poly(tuple(float(c) for c in module.coeffs), f"{where} PolyActivation")
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return None
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = _bn_affine(module)
        shape = (-1, 1, 1) if isinstance(module, nn.BatchNorm2d) else (-1,)
        return _ChannelAffine(scale.reshape(shape), shift.reshape(shape), f"{where} BatchNorm")
    kind = type(module).__name__
    hint = (" (no exact CKKS form: gt.nn.replace_activations(model) swaps it for a polynomial fit, "
            "or train with gt.nn.PolyActivation in place)" if type(module) in _REPLACEABLE else "")
    raise ModelError(f"{where}: {kind} is not supported by gt.nn.from_pytorch{hint}")


def _plain_steps(steps: list[_Step], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = step.plain(x)
    return x


def _fold(steps: list[_Step]) -> list[_Step]:
    """BatchNorm folded into the Linear/Conv2d right before it (no level used for it)."""
    out: list[_Step] = []
    for step in steps:
        prev = out[-1] if out else None
        if isinstance(step, _ChannelAffine) and isinstance(prev, _Affine):
            scale, shift = step.scale.reshape(-1), step.shift.reshape(-1)
            bias = prev.bias if prev.bias is not None else np.zeros(prev.weight.shape[1])
            out[-1] = _Affine(prev.weight * scale[None, :], bias * scale + shift,
                              prev.name + "+BatchNorm")
        elif isinstance(step, _ChannelAffine) and isinstance(prev, _Conv):
            scale, shift = step.scale.reshape(-1), step.shift.reshape(-1)
            bias = prev.bias if prev.bias is not None else np.zeros(prev.kernel.shape[0])
            out[-1] = _Conv(prev.kernel * scale[:, None, None, None], bias * scale + shift,
                            prev.stride, prev.padding, prev.name + "+BatchNorm")
        else:
            out.append(step)
    return out


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module | str]]:
    """The model as a chain of modules (Sequential, nested, or a torch.fx-traceable chain)."""
    if isinstance(model, torch.nn.Sequential):
        out: list[tuple[str, Any]] = []
        for name, child in model.named_children():
            if isinstance(child, torch.nn.Sequential):
                out += [(f"{name}.{n}", m) for n, m in _layers(child)]
            else:
                out.append((name, child))
        return out
    if not list(model.children()):
        return [(type(model).__name__, model)]
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except (torch.fx.proxy.TraceError, TypeError, ValueError, RuntimeError, AttributeError,
            NotImplementedError) as exc:  # what fx raises on data-dependent Python
        raise ModelError(f"from_pytorch: {type(model).__name__} is not a Sequential and torch.fx "
                         f"cannot trace it ({exc}); wrap its layers in torch.nn.Sequential") from None
    modules = dict(model.named_modules())
    out, last = [], None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            last = node if node.op == "placeholder" else last
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if args != [last] and not (len(args) == 2 and args[0] is last and args[1] is last):
            raise ModelError(f"from_pytorch: node {node.name} ({node.target}) is not a simple chain; "
                             "only sequential models are supported")
        if node.op == "call_module":
            out.append((str(node.target), modules[node.target]))
        elif node.target in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            out.append((node.name, torch.nn.Flatten(start, -1)))
        elif node.target in (operator.mul, torch.mul, torch.square, "square") or (
                node.target in (operator.pow, torch.pow, "pow") and node.args[1:] == (2,)):
            out.append((node.name, PolyActivation.square()))
        else:
            raise ModelError(f"from_pytorch: node {node.name} ({node.target}) is not supported")
        last = node
    return out


@dataclass
class Report:
    """Encrypted run against the float model on the same input."""

    max_abs_error: float
    mean_abs_error: float
    agreement: float | None  # fraction of equal argmax over the last dim (classifiers)
    seconds: float
    depth: int
    output_shape: tuple[int, ...]

    def __str__(self) -> str:
        agree = f", argmax agreement {self.agreement:.3f}" if self.agreement is not None else ""
        return (f"encrypted vs float: max |error| {self.max_abs_error:.3g}, mean "
                f"{self.mean_abs_error:.3g}{agree}; {self.seconds:.2f} s, depth {self.depth}")


class EncryptedModule:
    """A converted model: call it on an EncryptedTensor shaped like the sample."""

    def __init__(self, steps: list[_Step], sample_shape: tuple[int, ...], float_model: torch.nn.Module) -> None:
        self.steps = steps
        self.sample_shape = sample_shape
        self._float = float_model
        self.report: Report | None = None
        self.depth = 0
        self.depth = self._trace(4096)[0]
        params = choose_params(max(self.depth, 1))
        self._trace_slots = params.slots
        self.rotation_steps = self._trace(params.slots)[1]

    def _trace(self, slots: int) -> tuple[int, tuple[int, ...]]:
        from gravel.tensor._trace import TraceContext

        tc = TraceContext(slots)
        out = self(tc.encrypt(torch.zeros(self.sample_shape)))
        return tc.levels_used(out.level), tc.rotation_steps

    def rotation_steps_for(self, slots: int) -> tuple[int, ...]:
        """The rotation steps for a context with `slots` slots (layouts depend on it)."""
        return self.rotation_steps if slots == self._trace_slots else self._trace(slots)[1]

    def context(self, *, precision: int = 16, integer_bits: int = 10) -> Context:
        """Keys for this module: its depth, and Galois keys for its rotation steps only."""
        params = choose_params(max(self.depth, 1), precision_bits=precision, integer_bits=integer_bits)
        return Context(params=params, rotations=self.rotation_steps_for(params.slots))

    def __call__(self, x: EncryptedTensor) -> EncryptedTensor:
        if not isinstance(x, EncryptedTensor):
            raise InputError("an encrypted module takes an EncryptedTensor (ctx.encrypt(x))")
        if tuple(x.shape[1:]) != tuple(self.sample_shape[1:]):
            raise InputError(f"input shape {tuple(x.shape)}; the module was converted for "
                             f"(N, {', '.join(map(str, self.sample_shape[1:]))})")
        x.ctx.require(x.level, self.depth, "this module")
        for step in self.steps:
            x = step(x)
        return x

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The converted layers in the clear (float64): what the encrypted run approximates."""
        return _plain_steps(self.steps, x.double())

    def check(self, ctx: _TensorContext, sample: torch.Tensor) -> Report:
        """Encrypt `sample`, run, decrypt, and compare with the float model."""
        if not isinstance(ctx, Context):
            raise InputError("check needs the gt.Context holding the secret key (to decrypt)")
        t = time.perf_counter()
        out = self(ctx.encrypt(sample)).decrypt().double()
        seconds = time.perf_counter() - t
        with torch.no_grad():
            ref = self._float(sample.to(next(iter(self._float.parameters()), sample).dtype)).double()
        err = (out - ref).abs()
        agreement = None
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            agreement = float((out.argmax(-1) == ref.argmax(-1)).double().mean())
        self.report = Report(float(err.max()), float(err.mean()), agreement, seconds, self.depth,
                             tuple(out.shape))
        return self.report

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.steps)
        return f"EncryptedModule([{names}], depth={self.depth}, rotations={len(self.rotation_steps)})"


def from_pytorch(model: torch.nn.Module, sample: torch.Tensor, ctx: _TensorContext | None = None
                 ) -> EncryptedModule:
    """Convert `model` (eval mode is used; the model is not changed) for inputs shaped like
    `sample` (with its batch dimension). With `ctx` (a gt.Context), also run the sample encrypted
    and put the error against the float model in `module.report`."""
    if not isinstance(model, torch.nn.Module):
        raise InputError("from_pytorch takes a torch.nn.Module")
    if not isinstance(sample, torch.Tensor) or sample.ndim < 2:
        raise InputError("from_pytorch needs a sample tensor with a batch dimension, e.g. x[:1]")
    model = copy.deepcopy(model).eval()
    steps = [s for name, m in _layers(model) if (s := _convert(m, name)) is not None]
    if not steps:
        raise ModelError("from_pytorch: the model has no layers to convert")
    steps = _fold(steps)
    with torch.no_grad():
        ref = model(sample).double()
        mine = _plain_steps(steps, sample.double())
    if ref.shape != mine.shape or not torch.allclose(ref, mine, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max()))):
        raise ModelError("from_pytorch: the converted layers do not reproduce the model in the clear "
                         f"(max difference {float((ref - mine).abs().max()) if ref.shape == mine.shape else math.inf:.3g}); "
                         "its forward does more than its layers")
    module = EncryptedModule(steps, tuple(sample.shape), model)
    if ctx is not None:
        module.check(ctx, sample)
    return module

