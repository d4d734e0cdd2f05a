"""A corpus of small, common architectures on 8x8 digits inputs, for import and compile tests.

Each entry builds a plain float `nn.Module` (seeded, in eval mode, batch norm with non-trivial
running statistics) taking (N, 1, 8, 8) images or, for `flat` entries, (N, 64) vectors. The
import tests export every entry with both of torch's ONNX exporters and trace it through the
nn.Module path; the compile tests reuse the same entries. `opset` is the ONNX opset the
entry is exported at (the corpus spreads over 13 to 21; the dynamo exporter is asked for
at least 17, the lowest it can write for these models); `dynamic_batch` exports a symbolic
batch axis instead of a fixed 1; `fold=False` turns off the exporters' own constant folding
and graph optimisation, so that the file keeps BatchNormalization nodes, shape arithmetic and
the dynamo exporter's raw decompositions.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CORPUS", "Arch", "digits_batch", "export_onnx"]


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    flat: bool = False
    opset: int = 18
    dynamic_batch: bool = False
    fold: bool = True

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (64,) if self.flat else (1, 8, 8)

    def model(self) -> nn.Module:
        torch.manual_seed(sum(map(ord, self.name)))
        model = self.build()
        _randomise_batch_norm(model)
        return model.eval()


def _randomise_batch_norm(model: nn.Module) -> None:
    """Give every batch norm statistics and affine parameters far from identity, so that a
    wrong fold shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def digits_batch(n: int = 32, flat: bool = False) -> np.ndarray:
    """The first `n` scikit-learn digits scaled to [0, 1], float32, (n, 1, 8, 8) or (n, 64)."""
    from sklearn.datasets import load_digits

    x = (load_digits().data[:n] / 16.0).astype(np.float32)
    return x if flat else x.reshape(n, 1, 8, 8)


def export_onnx(arch: Arch, dynamo: bool, path: Path | None = None, model: nn.Module | None = None) -> bytes | Path:
    """Export `arch`'s model (or `model`, a trained instance) with one of torch's exporters: to
    `path` (the dynamo exporter writes its weights beside it in `<path>.data`) or, without a
    path, into bytes."""
    import warnings

    model = arch.model() if model is None else model.eval()
    # torch.export specialises a dimension of size 1, so a symbolic batch needs two samples
    sample = (torch.zeros((2 if arch.dynamic_batch else 1, *arch.input_shape)),)
    target: io.BytesIO | str = io.BytesIO() if path is None else str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dyn = ({0: torch.export.Dim("batch", min=1, max=1024)},) if arch.dynamic_batch else None
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(
                    model, sample, target, dynamo=True, opset_version=max(arch.opset, 17),
                    input_names=["x"], dynamic_shapes=dyn, verbose=False,
                    external_data=path is not None, optimize=arch.fold,
                )
        else:
            axes = {"x": {0: "batch"}, "y": {0: "batch"}} if arch.dynamic_batch else None
            torch.onnx.export(
                model, sample, target, dynamo=False, opset_version=arch.opset,
                input_names=["x"], output_names=["y"], dynamic_axes=axes,
                do_constant_folding=arch.fold,
            )
    return target.getvalue() if isinstance(target, io.BytesIO) else Path(target)


# ------------------------------------------------------------------------------- the models


class Lambda(nn.Module):
    """A module from a function of its input and itself (for small functional bodies)."""

    def __init__(self, fn: Callable[..., torch.Tensor], **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            self.add_module(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _mlp(*acts: nn.Module, width: int = 24) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, width)]
    for a in acts:
        layers += [a, nn.Linear(width, width)]
    layers[-1] = nn.Linear(width, 10)
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(5 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.tanh(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = F.max_pool2d(y, 2)
        return self.fc(y.reshape(y.size(0), -1))


class Normalised(nn.Module):
    """(x - mean) / std inside the graph, per channel, then a small CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3]).reshape(1, 1, 1))
        self.register_buffer("std", torch.tensor([0.4]).reshape(1, 1, 1))
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.avg_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


class FlatNormalised(nn.Module):
    """A flat [N, 64] input with per-feature normalisation as Sub and Div."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("mean", torch.rand(64, generator=g) * 0.5)
        self.register_buffer("std", torch.rand(64, generator=g) + 0.2)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1((x - self.mean) / self.std)))


class MatMuls(nn.Module):
    """Bare matmuls with parameters on either side, and a following bias add."""

    def __init__(self) -> None:
        super().__init__()
        self.right = nn.Parameter(torch.randn(8, 6) * 0.3)
        self.left = nn.Parameter(torch.randn(5, 8) * 0.3)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.fc = nn.Linear(5 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.right) + self.bias  # (N, 1, 8, 6): linear map on the last axis
        y = torch.relu(torch.matmul(self.left, y))  # (N, 1, 5, 6): on the second-last axis
        return self.fc(y.reshape(y.shape[0], -1))


class TransposeReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 3, 10)
        self.mix = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)  # (N, 8, 8, 3)
        y = y.transpose(1, 2).unsqueeze(1)  # (N, 1, 8, 8, 3)
        y = y.squeeze(1).reshape(-1, 8, 24)  # (N, 8, 24)
        y = torch.relu(self.mix(y.transpose(1, 2)))  # (N, 24, 8)
        return self.fc(y.flatten(1))


class Gating(nn.Module):
    """Products and differences of two computed branches, and x * x."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(64, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        a, b = self.a(x), self.b(x)
        y = a * torch.sigmoid(b) - b * b
        return self.fc(y * y)


def _pad_asym() -> nn.Module:
    def fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 2, 0, 1), value=0.25)  # left, right, top, bottom: asymmetric
        x = F.relu(m.conv1(x))  # (N, 3, 9, 11)
        x = F.relu(m.conv2(x))  # 'same' with an even kernel: asymmetric padding
        x = m.conv3(x)  # stride 2, dilation 2
        return m.fc(torch.flatten(x, 1))

    return Lambda(
        fn,
        conv1=nn.Conv2d(1, 3, 3, padding=1),
        conv2=nn.Conv2d(3, 3, 4, padding="same"),
        conv3=nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=1),
        fc=nn.Linear(4 * 4 * 5, 10),
    )


def _silu_explicit() -> nn.Module:
    def fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = m.fc1(x.flatten(1))
        h = h * torch.sigmoid(h)
        return m.fc2(h)

    return Lambda(fn, fc1=nn.Linear(64, 24), fc2=nn.Linear(24, 10))


def _unary_functions() -> nn.Module:
    def fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = m.fc1(x.flatten(1))
        y = torch.abs(h) + torch.exp(-h * 0.5) - torch.sqrt(torch.abs(h) + 1.0)
        y = y + 1.0 / (torch.abs(h) + 1.0) + torch.clamp(h, -0.5, 0.7) - torch.erf(h)
        y = y + torch.pow(h, 3) * 0.1 + h**2
        return m.fc2(-y)

    return Lambda(fn, fc1=nn.Linear(64, 16), fc2=nn.Linear(16, 10))


def _rounding() -> nn.Module:
    def fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = m.fc1(x.flatten(1)) * 3.0
        y = torch.floor(h) + torch.ceil(h) * 0.5 + torch.round(h) * 0.25 + torch.sign(h)
        return m.fc2(y)

    return Lambda(fn, fc1=nn.Linear(64, 16), fc2=nn.Linear(16, 10))


def _softmax_final() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10), nn.Softmax(dim=1))


CORPUS: list[Arch] = [
    Arch("mlp_relu", lambda: _mlp(nn.ReLU()), opset=13, dynamic_batch=True, fold=False),
    Arch("mlp_sigmoid_tanh", lambda: _mlp(nn.Sigmoid(), nn.Tanh()), opset=14),
    Arch("mlp_elu_family", lambda: _mlp(nn.LeakyReLU(0.1), nn.ELU(0.8), nn.SELU(), nn.CELU(1.3)), opset=15),
    Arch("mlp_gelu_erf", lambda: _mlp(nn.GELU(), nn.GELU(approximate="tanh")), opset=17, dynamic_batch=True),
    Arch("mlp_gelu20", lambda: _mlp(nn.GELU(), nn.GELU(approximate="tanh")), opset=20),
    Arch("mlp_hard", lambda: _mlp(nn.Hardsigmoid(), nn.Hardswish(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.8)), opset=16),
    Arch("mlp_soft", lambda: _mlp(nn.Softplus(), nn.Softsign(), nn.Mish()), opset=18),
    Arch("mlp_silu", lambda: _mlp(nn.SiLU()), opset=19),
    Arch("mlp_silu_explicit", _silu_explicit, opset=21, dynamic_batch=True),
    Arch("mlp_prelu", lambda: _mlp(nn.PReLU(24, 0.1), nn.PReLU()), opset=17),
    Arch("mlp_batchnorm", lambda: _mlp(nn.Sequential(nn.BatchNorm1d(24), nn.ReLU())), opset=18, fold=False),
    Arch("flat_normalised", FlatNormalised, flat=True, opset=18, dynamic_batch=True),
    Arch("cnn_normalised", Normalised, opset=13),
    Arch(
        "cnn_maxpool",
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1, padding=1, dilation=1, ceil_mode=True),
            nn.Flatten(), nn.Linear(4 * 3 * 3, 10),
        ),
        opset=18, dynamic_batch=True, fold=False,
    ),
    Arch(
        "cnn_avgpool",
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=1, padding=(1, 0)), nn.Tanh(),
            nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=True),
            nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
            nn.Flatten(), nn.Linear(3 * 6 * 5, 10),
        ),
        opset=19,
    ),
    Arch(
        "cnn_global_pool",
        lambda: nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(6, 10),
        ),
        opset=17, fold=False,
    ),
    Arch("resnet_block", Residual, opset=18, dynamic_batch=True, fold=False),
    Arch(
        "depthwise_separable",
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU6(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU6(),
            nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 10),
        ),
        opset=16, fold=False,
    ),
    Arch("concat_branches", Concat, opset=20, dynamic_batch=True),
    Arch("pad_asymmetric", _pad_asym, opset=19),
    Arch("transpose_reshape", TransposeReshape, opset=18, dynamic_batch=True, fold=False),
    Arch("matmul_both_sides", MatMuls, opset=14),
    Arch("gating_square", Gating, opset=21),
    Arch("unary_functions", _unary_functions, opset=18),
    Arch("rounding_sign", _rounding, opset=17),
    Arch("softmax_final", _softmax_final, opset=13, dynamic_batch=True),
]
