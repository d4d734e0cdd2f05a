"""Activations as polynomials: exact where they are one, a least-squares fit otherwise."""

import numpy as np
import pytest

from gravel.ckks.polyfit import exact_degree, polynomial_for
from gravel.compiler.ir import Node
from gravel.errors import ModelError


def _act(fn, **params):
    return Node("a", "act", ("x",), {"fn": fn, "params": params})


def test_fused_square_is_kept_exactly():
    # what canonicalise makes of x * x: a composite of one mul step
    node = _act("composite", steps=[{"fn": "mul", "args": [0, 0]}])
    p = polynomial_for(node, (4,), np.linspace(-3, 5, 50), degree=2)
    assert p.exact and p.coeffs == (0.0, 0.0, 1.0) and p.max_error == 0.0


def test_affine_composite_and_integer_pow_are_polynomials():
    steps = [{"fn": "pow", "params": {"exponent": 3.0}, "args": [0]},
             {"fn": "affine", "scale": 0.5, "shift": 1.0, "args": [1]}]
    assert exact_degree("composite", {"steps": steps}) == 3
    p = polynomial_for(_act("composite", steps=steps), (2,), np.linspace(-2, 2, 9))
    np.testing.assert_allclose(p.coeffs, [1.0, 0.0, 0.0, 0.5], atol=1e-9)
    assert exact_degree("pow", {"exponent": 2.5}) is None
    assert exact_degree("relu", {}) is None


def test_relu_is_fitted_on_the_calibrated_range_and_higher_degrees_fit_better():
    x = np.random.default_rng(0).normal(0.5, 2.0, 5000)
    p2 = polynomial_for(_act("relu"), (8,), x, degree=2)
    p4 = polynomial_for(_act("relu"), (8,), x, degree=4)
    assert not p2.exact and p2.degree == 2 and p4.degree == 4
    assert p2.lo == pytest.approx(x.min()) and p2.hi == pytest.approx(x.max())
    assert p4.max_error < p2.max_error < 0.2 * (x.max() - x.min())
    assert "relu replaced by a degree-2" in p2.describe()


def test_per_element_parameters_are_refused():
    node = _act("prelu", slope=np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ModelError, match="differ from element to element"):
        polynomial_for(node, (3,), np.linspace(-1, 1, 30))
