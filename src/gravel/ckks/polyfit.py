"""Activations as polynomials: CKKS evaluates only additions and multiplications.

An `act` node of the canonical graph is a univariate function. Where it *is* a polynomial
(`square`, `pow` with a whole exponent, and fused composites of those with affine steps, such as
`x*x` or `0.5*x*x + x`), its exact coefficients are recovered: nothing is approximated. Any other
function (relu, gelu, silu, tanh, ...) is replaced by the least-squares polynomial of a low degree
on the values its input took on the calibration data: CKKS pays one level per doubling of the
degree, so degrees 2 to 4 are what a model without bootstrapping can afford. The fit weighs the
calibration values themselves, where accuracy is decided (a uniform grid over the range fitted
the tails better and the model worse); what it costs in accuracy is measured by the caller on
the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.polynomial import polynomial as P

from gravel.compiler.ir import Node, activation
from gravel.errors import ModelError

__all__ = ["MAX_DEGREE", "ActPoly", "exact_degree", "polynomial_for"]

MAX_DEGREE = 8  # beyond this the depth (3+ levels per activation) leaves no room for a model
_MAX_SAMPLES = 200_000


@dataclass(frozen=True)
class ActPoly:
    """The polynomial standing for one activation node: coeffs[i] multiplies x^i."""

    node: str
    fn: str
    coeffs: tuple[float, ...]
    exact: bool
    lo: float
    hi: float
    max_error: float  # worst |p(x) - f(x)| on the calibration inputs (0 for exact ones)

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return P.polyval(x, np.asarray(self.coeffs))

    def describe(self) -> str:
        if self.exact:
            return f"{self.node}: {self.fn} is a polynomial of degree {self.degree}, kept exactly"
        return (f"{self.node}: {self.fn} replaced by a degree-{self.degree} least-squares polynomial "
                f"on [{self.lo:.3g}, {self.hi:.3g}] (worst error {self.max_error:.3g} on the "
                "calibration inputs)")


def exact_degree(fn: str, params: dict[str, Any] | None) -> int | None:
    """The degree of `fn` where it is a polynomial (with its parameters), else None."""
    params = params or {}
    if fn == "identity" or fn == "neg":
        return 1
    if fn == "square":
        return 2
    if fn == "pow":
        e = float(params.get("exponent", 2.0))
        return int(e) if e.is_integer() and 1 <= e <= MAX_DEGREE else None
    if fn == "composite":
        degrees = [1]
        for step in params.get("steps", ()):
            args = [degrees[i] for i in step.get("args", [len(degrees) - 1])]
            kind = step["fn"]
            if any(a is None for a in args):
                return None
            if kind == "affine":
                d = args[0]
            elif kind in ("add", "sub"):
                d = max(args)
            elif kind == "mul":
                d = args[0] + args[1]
            else:
                inner = exact_degree(kind, step.get("params"))
                d = None if inner is None else inner * args[0]
            if d is None or d > MAX_DEGREE:
                return None
            degrees.append(d)
        return degrees[-1]
    return None


def _scalar_function(node: Node, shape: tuple[int, ...]) -> Any:
    """f as a function of one scalar; refuses activations whose parameters differ per element
    (one polynomial serves every slot of a ciphertext)."""
    f = activation(node.attrs["fn"], node.attrs.get("params"))

    def scalar(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        full = np.broadcast_to(t.reshape((-1,) + (1,) * len(shape)), (t.size,) + tuple(shape))
        out = np.asarray(f(np.array(full)), dtype=np.float64).reshape(t.size, -1)
        if out.shape[1] > 1 and not np.allclose(out, out[:, :1], rtol=1e-9, atol=1e-12):
            raise ModelError(
                f"{node.where}: its parameters differ from element to element; the CKKS backend "
                "applies one polynomial to every element: fold per-channel scales into the "
                "neighbouring Gemm/Conv, or use the TFHE backend"
            )
        return out[:, 0]

    return scalar


def _to_x(coef_t: np.ndarray, mid: float, half: float) -> np.ndarray:
    """Coefficients in x of a polynomial fitted in t = (x - mid) / half."""
    poly = np.polynomial.Polynomial(coef_t)(np.polynomial.Polynomial([-mid / half, 1.0 / half]))
    return np.asarray(poly.coef, dtype=np.float64)


def polynomial_for(node: Node, shape: tuple[int, ...], inputs: np.ndarray,
                   degree: int = 2) -> ActPoly:
    """The polynomial for act `node` (input of per-sample `shape`, calibration `inputs`):
    exact where the function is one, else fitted with `degree` on the calibrated range."""
    if not isinstance(degree, int) or not 1 <= degree <= MAX_DEGREE:
        raise ModelError(f"polynomial degree must be an integer in [1, {MAX_DEGREE}], got {degree!r}")
    fn = node.attrs["fn"]
    name = node.source or node.name
    f = _scalar_function(node, shape)
    values = np.asarray(inputs, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ModelError(f"{node.where}: no calibration values reach it; calibrate with more samples")
    lo, hi = float(values.min()), float(values.max())
    if values.size > _MAX_SAMPLES:
        values = np.random.default_rng(0).choice(values, _MAX_SAMPLES, replace=False)
    span = max(hi - lo, 1e-6)
    mid, half = (lo + hi) / 2, span / 2 * 1.05
    exact = exact_degree(fn, node.attrs.get("params"))
    if exact is not None:
        k = np.arange(2 * exact + 3)
        t = np.cos(math.pi * (k + 0.5) / len(k))  # Chebyshev nodes: a well-conditioned solve
        coef_t = P.polyfit(t, f(mid + half * t), exact)
        coeffs = _to_x(coef_t, mid, half)
        probe = np.linspace(lo - span, hi + span, 101)
        ref = f(probe)
        err = np.max(np.abs(P.polyval(probe, coeffs) - ref)) / max(1.0, float(np.max(np.abs(ref))))
        if err < 1e-7:
            coeffs[np.abs(coeffs) < 1e-12 * max(1.0, float(np.max(np.abs(coeffs))))] = 0.0
            # snap coefficients that are whole numbers up to rounding (x*x gives 1.0000000002)
            snapped = np.round(coeffs)
            close = np.abs(coeffs - snapped) < 1e-9
            coeffs[close] = snapped[close]
            return ActPoly(name, fn, tuple(float(c) for c in _trim(coeffs)), True, lo, hi, 0.0)
    # least squares on the calibration values themselves: accuracy is decided where the inputs
    # are (on MNIST's 784-128-64-10 ReLU model, degree 4: 91.8 % against 92.3 % float; with half
    # the weight on a uniform grid over the range instead: 89.8 %)
    t_cal = (values - mid) / half
    coef_t = P.polyfit(t_cal, f(mid + half * t_cal), degree)
    coeffs = _to_x(coef_t, mid, half)
    if not np.all(np.isfinite(coeffs)):
        raise ModelError(f"{node.where}: no usable polynomial for {fn} on [{lo:.3g}, {hi:.3g}]")
    err = float(np.max(np.abs(P.polyval(values, coeffs) - f(values))))
    return ActPoly(name, fn, tuple(float(c) for c in coeffs), False, lo, hi, err)


def _trim(coeffs: np.ndarray) -> np.ndarray:
    c = list(coeffs)
    while len(c) > 1 and c[-1] == 0.0:
        c.pop()
    return np.asarray(c)
