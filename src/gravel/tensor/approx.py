"""Polynomial approximations of activations on a stated range (CKKS evaluates polynomials only).

Each is a least-squares fit at Chebyshev nodes of the range (close to the minimax polynomial),
returned in the power basis `[c0, c1, ..., cd]` with its worst error on the range, measured on a
dense grid. Outside the range the polynomial is not the function and grows fast: scale inputs
into the range (standardise features, bound weights) and check `max_error`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gravel.errors import InputError

__all__ = ["Approximation", "fit", "relu", "sigmoid", "tanh"]


@dataclass(frozen=True)
class Approximation:
    """A polynomial standing for `name` on [low, high]."""

    name: str
    coeffs: tuple[float, ...]
    low: float
    high: float
    max_error: float

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The polynomial in the clear (numpy or torch, element-wise)."""
        out = 0.0 * x + self.coeffs[-1]
        for c in reversed(self.coeffs[:-1]):
            out = out * x + c
        return out


def fit(fn: Callable[[np.ndarray], np.ndarray], low: float, high: float, degree: int,
        name: str = "function", even: bool = False, odd: bool = False) -> Approximation:
    """Least-squares fit of `fn` on [low, high] at Chebyshev nodes; `odd`/`even` keep only odd or
    even powers (for odd or even functions on a symmetric range: fewer multiplications)."""
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"{name}: the range must be finite with low < high, got [{low}, {high}]")
    if not isinstance(degree, int) or degree < 1 or degree > 31:
        raise InputError(f"{name}: degree must be an integer in [1, 31], got {degree!r}")
    k = np.arange(8 * (degree + 1))
    nodes = np.cos(np.pi * (k + 0.5) / len(k))
    x = low + (nodes + 1) * (high - low) / 2
    powers = [p for p in range(degree + 1)
              if not (odd and p % 2 == 0) and not (even and p % 2 == 1)]
    basis = np.stack([x**p for p in powers], axis=1)
    sol, *_ = np.linalg.lstsq(basis, fn(x), rcond=None)
    coeffs = np.zeros(degree + 1)
    coeffs[powers] = sol
    grid = np.linspace(low, high, 4001)
    approx = Approximation(name, tuple(float(c) for c in coeffs), float(low), float(high), 0.0)
    err = float(np.max(np.abs(approx(grid) - fn(grid))))
    return Approximation(name, approx.coeffs, float(low), float(high), err)


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def sigmoid(low: float = -8.0, high: float = 8.0, degree: int = 3) -> Approximation:
    """Sigmoid on [low, high]. Degree 3 (two levels): 0.5 + 0.1405x - 0.00131x^3 on [-8, 8],
    within 0.11 of the sigmoid there (0.047 on [-5, 5]); degree 5 (three levels) within 0.055 on
    [-8, 8]. Good enough to train logistic regression, whose gradient only needs the sign and
    rough size of the error."""
    odd = low == -high
    base = fit(lambda x: _sig(x) - 0.5, low, high, degree, "sigmoid", odd=odd)
    coeffs = (base.coeffs[0] + 0.5,) + base.coeffs[1:]
    return Approximation("sigmoid", coeffs, base.low, base.high, base.max_error)


def tanh(low: float = -4.0, high: float = 4.0, degree: int = 5) -> Approximation:
    """tanh on [low, high]; degree 5 on [-4, 4] is within 0.11."""
    return fit(np.tanh, low, high, degree, "tanh", odd=low == -high)


def relu(low: float = -4.0, high: float = 4.0, degree: int = 4) -> Approximation:
    """ReLU on [low, high]. It is not smooth at 0, where polynomials are worst: degree 4 on
    [-4, 4] is within 0.26, degree 2 (one level less) within 0.43. Networks trained with the
    polynomial in place (gt.nn.PolyActivation) do not pay that error."""
    return fit(lambda x: np.maximum(x, 0.0), low, high, degree, "relu", even=False)
