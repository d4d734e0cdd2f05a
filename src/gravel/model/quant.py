"""Fake-quantization layers trained with a straight-through estimator (STE).

Each layer quantizes exactly as the compiler will: symmetric per-tensor weights scaled by their
largest magnitude, activations clipped to a learned bound (PACT) on an unsigned n-bit grid, and
inputs on a (2^bits - 1)-step grid over [0, 1]. The compiler reads `bits`, the weights and
`clip` from these modules, so what was trained is what runs encrypted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "InputQuant",
    "QuantConv2d",
    "QuantLinear",
    "QuantReLU",
    "SignActivation",
    "quantize_weight",
]


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, gradient of hardtanh (the BinaryNet estimator)."""
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    soft = torch.clamp(x, -1.0, 1.0)
    return soft + (hard - soft).detach()


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor fake quantization to signed `bits` bits; 1 bit means sign."""
    if bits == 1:
        return _ste_sign(w)
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().max().clamp(min=1e-8) / qmax
    return _ste_round(w / scale) * scale


class InputQuant(nn.Module):
    """Quantizes pixels in [0, 1] to `bits` bits, as the client will before encrypting."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        return _ste_round(x.clamp(0, 1) * levels) / levels


class QuantLinear(nn.Linear):
    """Linear layer whose weights are fake-quantized to `w_bits` bits."""

    def __init__(self, in_features: int, out_features: int, w_bits: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.w_bits = w_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, quantize_weight(self.weight, self.w_bits), self.bias)


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weights are fake-quantized to `w_bits` bits."""

    def __init__(self, *args, w_bits: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.w_bits = w_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, quantize_weight(self.weight, self.w_bits), self.bias)


class BinaryLinear(QuantLinear):
    """Linear layer with weights in {-1, +1} (BinaryNet); no bias, batch norm follows."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, w_bits=1, bias=False)


class BinaryConv2d(QuantConv2d):
    """Conv2d with weights in {-1, +1}; no padding, so that padding never meets a -1/+1 input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=False, w_bits=1)


class QuantReLU(nn.Module):
    """ReLU clipped at a learned bound and quantized to `bits` bits (PACT)."""

    def __init__(self, bits: int, init_clip: float = 4.0) -> None:
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(torch.tensor(float(init_clip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = self.clip.abs() + 1e-3
        y = torch.minimum(F.relu(x), clip)
        levels = 2**self.bits - 1
        return _ste_round(y / clip * levels) * clip / levels


class SignActivation(nn.Module):
    """Binary activation: +1 where x >= 0, else -1."""

    bits = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ste_sign(x)
