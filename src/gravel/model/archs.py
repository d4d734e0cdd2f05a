"""Named architectures, so that a checkpoint records a name and options rather than code.

`mlp` and `cnn` are n-bit quantization-aware networks, `bnn-mlp` is a binarized network in the
style of the original Gravel (weights and activations in {-1, +1}, batch norm folded into integer
thresholds at compile time), and the `float-*` variants are plain PyTorch models that the
compiler quantizes post-training, as it does for any imported model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from gravel.errors import ModelError
from gravel.model.quant import (
    BinaryLinear,
    InputQuant,
    QuantConv2d,
    QuantLinear,
    QuantReLU,
    SignActivation,
)

__all__ = ["ARCHS", "DEFAULT_OPTIONS", "build_model"]

DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [128, 64], "in_bits": 2, "w_bits": 4, "a_bits": 3},
    "float-mlp": {"hidden": [128, 64]},
    "bnn-mlp": {"hidden": [128, 128], "in_bits": 2},
    "cnn": {"channels": 2, "in_bits": 2, "w_bits": 4, "a_bits": 3},
    "float-cnn": {"channels": 2},
}


def _mlp(shape, classes, hidden, in_bits, w_bits, a_bits) -> nn.Sequential:
    layers: list[nn.Module] = [InputQuant(in_bits), nn.Flatten()]
    width = math.prod(shape)
    for h in hidden:
        layers += [QuantLinear(width, h, w_bits), QuantReLU(a_bits)]
        width = h
    layers.append(QuantLinear(width, classes, w_bits))
    return nn.Sequential(*layers)


def _float_mlp(shape, classes, hidden) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _bnn_mlp(shape, classes, hidden, in_bits) -> nn.Sequential:
    layers: list[nn.Module] = [InputQuant(in_bits), nn.Flatten()]
    width = math.prod(shape)
    for h in hidden:
        layers += [BinaryLinear(width, h), nn.BatchNorm1d(h), SignActivation()]
        width = h
    layers += [BinaryLinear(width, classes), nn.BatchNorm1d(classes)]
    return nn.Sequential(*layers)


def _cnn(shape, classes, channels, in_bits=None, w_bits=None, a_bits=None) -> nn.Sequential:
    """conv 3x3 (same size) -> batch norm -> ReLU -> 2x2 average pool -> linear."""
    c, h, w = shape
    quant = in_bits is not None
    conv: nn.Module
    if quant:
        conv = QuantConv2d(c, channels, 3, stride=1, padding=1, w_bits=w_bits)
    else:
        conv = nn.Conv2d(c, channels, 3, stride=1, padding=1)
    ho, wo = h // 2, w // 2
    layers: list[nn.Module] = [InputQuant(in_bits)] if quant else []
    layers += [
        conv,
        nn.BatchNorm2d(channels),
        QuantReLU(a_bits) if quant else nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        QuantLinear(channels * ho * wo, classes, w_bits) if quant else nn.Linear(channels * ho * wo, classes),
    ]
    return nn.Sequential(*layers)


ARCHS: dict[str, Callable[..., nn.Sequential]] = {
    "mlp": _mlp,
    "float-mlp": _float_mlp,
    "bnn-mlp": _bnn_mlp,
    "cnn": _cnn,
    "float-cnn": _cnn,
}


def build_model(
    arch: str, input_shape: tuple[int, ...], num_classes: int, **options: Any
) -> tuple[nn.Sequential, dict[str, Any]]:
    """Build an architecture; returns the model and the full options (defaults filled in)."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    unknown = set(options) - set(DEFAULT_OPTIONS[arch])
    if unknown:
        raise ModelError(f"architecture {arch!r} has no option(s) {', '.join(sorted(unknown))}")
    full = {**DEFAULT_OPTIONS[arch], **{k: v for k, v in options.items() if v is not None}}
    for key in ("in_bits", "w_bits", "a_bits"):
        if key in full and not 1 <= int(full[key]) <= 8:
            raise ModelError(f"{key}={full[key]} is outside 1..8 bits")
    if full.get("w_bits") == 1 or full.get("a_bits") == 1:
        raise ModelError("1-bit weights or activations: use the binarized architecture bnn-mlp")
    return ARCHS[arch](tuple(input_shape), num_classes, **full), full
