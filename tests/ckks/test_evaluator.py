"""The CKKS evaluator against numpy: exact scales, automatic level alignment, depth budget."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gravel.ckks import Ciphertext, Evaluator, SecretContext, choose_params, polyval_depth
from gravel.errors import DepthError

TOL = 1e-4  # |error| bound for values in [-2, 2] after up to 3 levels (measured ~1e-5)


@pytest.fixture(scope="module")
def ev():
    ctx = SecretContext.create(choose_params(3))  # N=8192, power-of-two rotation keys
    return Evaluator(ctx)


@pytest.fixture(scope="module")
def data(ev):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-2, 2, ev.slots), rng.uniform(-2, 2, ev.slots)
    return x, y, ev.encrypt(x), ev.encrypt(y)


def close(ev, ct, ref, tol=TOL):
    np.testing.assert_allclose(ev.decrypt(ct), ref, atol=tol)


def test_arithmetic_and_levels(ev, data):
    x, y, a, b = data
    top = ev.context.top_level
    close(ev, ev.add(a, b), x + y)
    close(ev, ev.sub(a, b), x - y)
    close(ev, ev.negate(a), -x)
    close(ev, ev.add_plain(a, 1.5), x + 1.5)
    prod = ev.mul(a, b)
    assert prod.level == top - 1
    close(ev, prod, x * y)
    assert ev.mul_int(a, 3).level == top  # integer scalars are free
    close(ev, ev.mul_int(a, 3), 3 * x)
    close(ev, ev.mul_scalar(a, 0.25), 0.25 * x)
    close(ev, ev.mul_plain(a, y), x * y)
    close(ev, ev.dot_many([(a, b), (a, a)]), x * y + x * x)


def test_levels_align_exactly(ev, data):
    x, y, a, b = data
    low = ev.mul(a, b)                    # level top-1
    mixed = ev.add(low, a)                # a is brought down exactly
    assert mixed.level == low.level
    assert mixed.scale == ev.context.scale_at(mixed.level)
    close(ev, mixed, x * y + x)
    close(ev, ev.drop_to(a, 0), x)


def test_rotations(ev, data):
    x, _, a, _ = data
    for step in (1, 5, -3, 1000):
        close(ev, ev.rotate(a, step), np.roll(x, -step))
    ref = sum(np.roll(x, -3 * t) for t in range(7))
    close(ev, ev.rotate_sum(a, 3, 7), ref, 5 * TOL)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=2, max_size=8))
def test_polyval_matches_numpy(ev, data, coeffs):
    x, _, a, _ = data
    if all(c == 0 for c in coeffs[1:]):
        coeffs[1] = 0.5
    out = ev.polyval(a, coeffs)
    degree = max(i for i, c in enumerate(coeffs) if c != 0)
    assert out.level == ev.context.top_level - polyval_depth(coeffs)
    assert polyval_depth(coeffs) <= polyval_depth(degree)
    ref = np.polynomial.polynomial.polyval(x, coeffs)
    close(ev, out, ref, 1e-3 * (1 + np.abs(ref).max()))


def test_depth_runs_out_with_a_clear_error(ev, data):
    _, _, a, _ = data
    c = a
    for _ in range(ev.context.top_level):
        c = ev.square(c)
    assert c.level == 0
    with pytest.raises(DepthError, match=r"a square needs depth 4; the context has 3"):
        ev.square(c)
    with pytest.raises(DepthError, match="polyval"):
        ev.polyval(ev.square(a), [0, 1, 0, 0, 0, 0, 0, 1.5])


def test_zero_results_are_valid_ciphertexts(ev, data):
    x, _, a, _ = data
    close(ev, ev.sub(a, a), 0 * x)
    close(ev, ev.mul_plain(a, np.zeros(4)), 0 * x)
    close(ev, ev.mul_int(a, 0), 0 * x)


def test_ciphertext_bytes_round_trip(ev, data):
    x, _, a, b = data
    fresh = a.to_bytes()
    full = ev.add(a, b).to_bytes()
    assert len(fresh) < 0.6 * len(full)  # seeded symmetric encryption: about half
    back = Ciphertext.from_bytes(ev.context, fresh)
    close(ev, ev.mul(back, back), x * x)
