"""Linear maps by the diagonal method (BSGS) against numpy and torch, on the layouts they make."""

import numpy as np
import pytest
import torch

from gravel.ckks import Evaluator, SecretContext, choose_params
from gravel.ckks.packing import (
    LinearMap,
    avg_pool2d_map,
    contiguous_layout,
    conv2d_map,
    gather_map,
    matmul_map,
    n_chunks,
    samples_layout,
    sum_map,
)
from gravel.errors import InputError

SLOTS = 4096


@pytest.fixture(scope="module")
def ev():
    return Evaluator(SecretContext.create(choose_params(2)))


def run(ev, lm, x, in_layout, out_layout):
    slots = ev.slots
    buf = np.zeros(n_chunks(in_layout, slots) * slots)
    buf[in_layout.ravel()] = x.ravel()
    cts = [ev.encrypt(buf[i * slots:(i + 1) * slots]) for i in range(len(buf) // slots)]
    outs = lm.apply(ev, cts)
    assert all(o.level == cts[0].level - 1 for o in outs)  # one level
    res = np.concatenate([ev.decrypt(o) for o in outs])
    return res[out_layout]


def test_layouts():
    lay = contiguous_layout((3, 5, 7), 64)
    assert len(np.unique(lay)) == lay.size
    assert np.all(lay[:, :, 1:] - lay[:, :, :-1] == 1)  # rows never split
    assert n_chunks(contiguous_layout((10, 1000), 4096), 4096) == 3
    s = samples_layout(300, 5, 4096)
    assert s.shape == (300, 5) and len(np.unique(s)) == s.size
    assert np.all(s[1:, :] - s[:-1, :] == 1)  # samples of one feature are consecutive
    with pytest.raises(InputError, match="do not fit"):
        samples_layout(5000, 2, 4096)


@pytest.mark.parametrize("shape", [(64, 64, 64), (3, 10, 25), (2, 40, 90)])
def test_matmul_map(ev, shape):
    b, n, m = shape
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(b, n)), rng.normal(size=(n, m)) / np.sqrt(n)
    lay = contiguous_layout((b, n), ev.slots)
    lm, out = matmul_map(w, lay, ev.slots, ev.context.rotation_steps)
    np.testing.assert_allclose(run(ev, lm, x, lay, out), x @ w, atol=1e-3)
    assert len(np.unique(out)) == out.size


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1)])
def test_conv2d_map(ev, stride, padding):
    rng = np.random.default_rng(2)
    x, k = rng.normal(size=(1, 2, 28, 28)), rng.normal(size=(3, 2, 3, 3))
    lay = contiguous_layout(x.shape, ev.slots)
    lm, out = conv2d_map(k, lay, ev.slots, stride, padding, ev.context.rotation_steps)
    ref = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(k), stride=stride, padding=padding)
    np.testing.assert_allclose(run(ev, lm, x, lay, out), ref.numpy(), atol=1e-3)


def test_pool_sum_gather(ev):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 8, 8))
    lay = contiguous_layout(x.shape, ev.slots)
    lm, out = avg_pool2d_map(lay, 2, None, ev.slots, ev.context.rotation_steps)
    ref = torch.nn.functional.avg_pool2d(torch.tensor(x), 2).numpy()
    np.testing.assert_allclose(run(ev, lm, x, lay, out), ref, atol=1e-4)
    for axis in range(4):
        lm, out = sum_map(lay, axis, ev.slots, 0.5, ev.context.rotation_steps)
        np.testing.assert_allclose(run(ev, lm, x, lay, out), 0.5 * x.sum(axis), atol=1e-3)
    target = contiguous_layout((8, 8, 3, 2), ev.slots)
    moved = np.transpose(lay, (3, 2, 1, 0))
    lm = gather_map(target, moved, ev.slots)
    np.testing.assert_allclose(run(ev, lm, x, lay, target), np.transpose(x, (3, 2, 1, 0)), atol=1e-4)


def test_rotation_steps_are_what_the_map_uses():
    """A context holding exactly the map's rotation steps evaluates it (no composed rotations)."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(20, 12))
    params = choose_params(1)  # N=4096
    lay = contiguous_layout((4, 20), params.slots)
    lm, out = matmul_map(w, lay, params.slots)  # planned for exact keys
    steps = lm.rotation_steps()
    assert steps and len(steps) < lm.n_diagonals  # BSGS: fewer rotations than diagonals
    ctx = SecretContext.create(params, rotation_steps=steps)
    ev = Evaluator(ctx)
    x = rng.normal(size=(4, 20))
    lm2 = LinearMap.from_entries(*_entries(w, lay, out), params.slots, available_steps=steps)
    np.testing.assert_allclose(run(ev, lm2, x, lay, out), x @ w, atol=1e-3)
    assert lm2.rotation_steps() == steps


def _entries(w, lay, out):
    n, m = w.shape
    o = np.broadcast_to(out[:, None, :], (lay.shape[0], n, m))
    i = np.broadcast_to(lay[:, :, None], (lay.shape[0], n, m))
    return o, i, np.broadcast_to(w[None], (lay.shape[0], n, m))


def test_bad_shapes_refused():
    lay = contiguous_layout((4, 5), SLOTS)
    with pytest.raises(InputError, match="cannot multiply"):
        matmul_map(np.ones((6, 2)), lay, SLOTS)
    with pytest.raises(InputError, match="input channels"):
        conv2d_map(np.ones((1, 2, 3, 3)), contiguous_layout((1, 1, 8, 8), SLOTS), SLOTS)
    with pytest.raises(InputError, match="finite"):
        LinearMap.from_entries([0], [1], [np.nan], SLOTS)
