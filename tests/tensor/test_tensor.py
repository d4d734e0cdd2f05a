"""EncryptedTensor against torch: every operation within a stated tolerance, over shapes and values.

Tolerance: |encrypted - torch| <= 1e-3 * (1 + |torch|) for values in [-2, 2] and chains of up to
four levels (measured errors are ~1e-5 at the 2^32 scale of a depth-4 context)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gravel.tensor as gt
from gravel.errors import BlobFormatError, DepthError, InputError, KeyMismatchError

SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def close(enc, ref, tol=1e-3):
    out = enc.decrypt()
    ref = torch.as_tensor(ref, dtype=out.dtype)
    assert tuple(out.shape) == tuple(ref.shape)
    assert torch.all((out - ref).abs() <= tol * (1 + ref.abs())), float((out - ref).abs().max())


def shapes(min_dims=1, max_dims=3):
    return st.lists(st.integers(1, 6), min_size=min_dims, max_size=max_dims).map(tuple)


def tensor(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 4 - 2


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**16), c=st.floats(-3, 3))
def test_elementwise_with_scalars_and_plain(gt_ctx, shape, seed, c):
    x = tensor(shape, seed)
    e = gt_ctx.encrypt(x)
    close(e + c, x + c)
    close(c - e, c - x)
    close(e * c, x * c)
    close(-e * 2 + e, -x * 2 + x)
    p = tensor(shape[-1:], seed + 1)  # broadcast over leading dims
    close(e + p, x + p)
    close(e * p, x * p)


@SETTINGS
@given(shape=shapes(), seed=st.integers(0, 2**16), bcast=st.booleans())
def test_elementwise_encrypted(gt_ctx, shape, seed, bcast):
    x = tensor(shape, seed)
    y = tensor(shape[-1:] if bcast else shape, seed + 7)
    a, b = gt_ctx.encrypt(x), gt_ctx.encrypt(y)
    close(a + b, x + y)
    close(a - b, x - y)
    close(a * b, x * y)
    close(b * a + a, y * x + x)


@SETTINGS
@given(shape=shapes(2, 3), seed=st.integers(0, 2**16), data=st.data())
def test_reductions_and_layout_ops(gt_ctx, shape, seed, data):
    x = tensor(shape, seed)
    e = gt_ctx.encrypt(x)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    close(e.sum(dim), x.sum(dim))
    close(e.mean(dim, keepdim=True), x.mean(dim, keepdim=True))
    close(e.sum(), x.sum())
    close(e.transpose(0, -1), x.transpose(0, -1))
    close(e.reshape(-1), x.reshape(-1))
    if len(shape) == 2:
        close(e.T.sum(0), x.T.sum(0))
    close(e[0], x[0])
    close(e.flatten().sum(), x.sum())


@SETTINGS
@given(b=st.integers(1, 5), n=st.integers(1, 12), m=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_matmul_plain_both_sides(gt_ctx, b, n, m, seed):
    x, w = tensor((b, n), seed), tensor((n, m), seed + 1)
    e = gt_ctx.encrypt(x)
    close(e @ w, x @ w)
    close(w.T @ e.T, w.T @ x.T)
    close(e @ w[:, 0], x @ w[:, 0])
    close(gt_ctx.encrypt(x[0]) @ w, x[0] @ w)


def test_matmul_and_dot_encrypted(gt_ctx):
    x, y = tensor((3, 5), 1), tensor((5, 4), 2)
    a, b = gt_ctx.encrypt(x), gt_ctx.encrypt(y)
    out = a @ b
    assert out.depth_used == 3
    close(out, x @ y)
    v, w = tensor((6,), 3), tensor((6,), 4)
    close(gt.dot(gt_ctx.encrypt(v), gt_ctx.encrypt(w)), v @ w)
    close(gt_ctx.encrypt(v).dot(w), v @ w)


def test_the_issue_example(gt_ctx):
    x = tensor((4, 8), 5)
    w, b = tensor((8, 3), 6), tensor((3,), 7)
    e = gt_ctx.encrypt(x)
    y = (e * 2 + e) @ w + b
    assert y.depth_used == 1  # * 2 is free, the matmul is one level
    close(y, (x * 2 + x) @ w + b)
    close(y.sum(dim=1), ((x * 2 + x) @ w + b).sum(1))
    coeffs = [0.5, 0.197, 0, -0.004]
    ref = (x * 2 + x) @ w + b
    close(y.polyval(coeffs), 0.5 + 0.197 * ref - 0.004 * ref**3)


@pytest.mark.parametrize("name,low,high,degree", [("sigmoid", -8, 8, 3), ("tanh", -4, 4, 5), ("relu", -4, 4, 2)])
def test_polynomial_activations(gt_ctx, name, low, high, degree):
    x = torch.linspace(low, high, 50)
    a = getattr(gt.approx, name)(low, high, degree)
    out = getattr(gt, name)(gt_ctx.encrypt(x), low, high, degree)
    close(out, a(x.double()), 1e-3)  # the polynomial, encrypted
    true = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[name](x)
    assert float((out.decrypt() - true).abs().max()) <= a.max_error + 1e-3  # the stated range error


def test_conv2d_and_pool(gt_ctx):
    img, k, bias = tensor((2, 10, 10), 8), tensor((3, 2, 3, 3), 9) / 3, torch.tensor([1.0, -1.0, 0.5])
    e = gt_ctx.encrypt(img)
    for stride, padding in [(1, 1), (2, 0)]:
        ref = torch.nn.functional.conv2d(img[None], k, bias, stride=stride, padding=padding)[0]
        close(gt.conv2d(e, k, bias, stride, padding), ref)
    close(gt.avg_pool2d(e, 2), torch.nn.functional.avg_pool2d(img[None], 2)[0])
    close(gt.avg_pool2d(gt_ctx.encrypt(img[None]), 2, 1), torch.nn.functional.avg_pool2d(img[None], 2, 1))


def test_depth_errors_name_the_operation(gt_ctx):
    e = gt_ctx.encrypt(tensor((4,), 10))
    deep = e * e * e * e * e  # four multiplications: the whole budget
    assert deep.level == 0
    with pytest.raises(DepthError, match=r"matmul needs depth 5; the context has 4.*gt.Context\(depth=5\)"):
        deep @ torch.ones(4, 2)
    with pytest.raises(DepthError, match=r"polyval of degree 3 needs depth 5"):
        (e * e * e * e).polyval([0.5, 0.197, 0, -0.004])
    two_left = e * e * e
    with pytest.raises(DepthError, match="matmul of two encrypted tensors needs depth 5"):
        two_left.unsqueeze(1) @ two_left.unsqueeze(0)
    with pytest.raises(DepthError, match="needs depth 5"):
        gt.nn.from_pytorch(torch.nn.Linear(4, 2), torch.ones(1, 4))(deep.unsqueeze(0))


def test_bad_input_is_refused(gt_ctx):
    e = gt_ctx.encrypt(tensor((3, 4), 11))
    with pytest.raises(InputError, match="do not broadcast"):
        e + torch.ones(5)
    with pytest.raises(InputError, match="cannot multiply"):
        e @ torch.ones(5, 2)
    with pytest.raises(InputError, match="cannot view"):
        e.reshape(5, 2)
    with pytest.raises(InputError, match="CKKS has no division"):
        e / e
    with pytest.raises(InputError, match="NaN"):
        gt_ctx.encrypt(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InputError, match="integer_bits"):
        gt_ctx.encrypt(torch.tensor([1e6]))
    with pytest.raises(TypeError, match="truth value"):
        bool(e)


def test_serialization_round_trip_then_compute(gt_ctx):
    """Owner -> compute party (public context, no secret) -> owner, the op repeated after load."""
    x, w = tensor((5, 6), 12), tensor((6, 2), 13)
    pub = gt.PublicContext.load(gt_ctx.serialize_public())
    assert not pub.has_secret_key() and gt_ctx.has_secret_key()
    remote = gt.EncryptedTensor.load(pub, gt_ctx.encrypt(x).serialize())
    out = (remote * remote + 1) @ w
    with pytest.raises(KeyMismatchError, match="needs the secret key"):
        out.decrypt()
    back = gt.EncryptedTensor.load(gt_ctx, out.serialize())
    close(back, (x * x + 1) @ w)
    # a non-contiguous layout (transposed, sliced) survives too
    again = gt.EncryptedTensor.load(pub, back.T[1:].serialize())
    close(gt.EncryptedTensor.load(gt_ctx, (again * 2).serialize()), 2 * ((x * x + 1) @ w).T[1:])


def test_tensor_of_another_context_refused(gt_ctx):
    other = gt.Context(depth=1)
    blob = other.encrypt(torch.ones(3)).serialize()
    with pytest.raises(KeyMismatchError, match="another CKKS context"):
        gt.EncryptedTensor.load(gt_ctx, blob)
    with pytest.raises(KeyMismatchError, match="different contexts"):
        gt_ctx.encrypt(torch.ones(3)) + other.encrypt(torch.ones(3))


def test_hostile_tensor_blobs_refused(gt_ctx):
    good = gt_ctx.encrypt(tensor((2, 3), 14)).serialize()
    for bad in (b"", b"GRVL", good[:60], good[:-1], good + b"x", good[:38] + b"\xff" * 8 + good[46:]):
        with pytest.raises(KeyMismatchError):
            gt.EncryptedTensor.load(gt_ctx, bad)
    with pytest.raises(KeyMismatchError, match="expected ckks ciphertext, got ckks public context"):
        gt.EncryptedTensor.load(gt_ctx, gt_ctx.serialize_public())
    # damaged bytes and bytes for other keys are told apart (send again / use the right keys)
    with pytest.raises(BlobFormatError, match="truncated or altered"):
        gt.EncryptedTensor.load(gt_ctx, good[:-1])
