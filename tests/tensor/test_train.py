"""Training on encrypted data: the two parties exchange bytes only; the result equals plaintext
training of the same model (same split, polynomial, learning rate, epochs)."""

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from gravel.errors import InputError, KeyMismatchError
from gravel.tensor import approx
from gravel.tensor.train import ComputeParty, DataOwner, predict, train_encrypted, train_plaintext


@pytest.fixture(scope="module")
def cancer():
    d = load_breast_cancer()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d.target))
    x = (d.data - d.data.mean(0)) / d.data.std(0) / 4
    tr, te = idx[:400], idx[400:]
    return x[tr], d.target[tr], x[te], d.target[te]


def test_logistic_matches_plaintext(cancer):
    x, y, xt, yt = cancer
    sig = approx.sigmoid(-16, 16, 3)
    res = train_encrypted(x, y, "logistic", epochs=3, lr=2.0, sigmoid=sig)
    plain = train_plaintext(x, y, "logistic", epochs=3, lr=2.0, sigmoid=sig)
    assert res.refreshes == 2  # depth 4: one step per refresh, none after the last
    assert np.max(np.abs(res.weights - plain)) < 5e-3
    acc_enc = np.mean(predict(res.weights, xt, "logistic", res.classes) == yt)
    acc_plain = np.mean(predict(plain, xt, "logistic", res.classes) == yt)
    assert abs(acc_enc - acc_plain) <= 0.02
    assert acc_plain > 0.85


def test_one_vs_rest_and_linear_regression(gt_ctx):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3)) / 3
    y = np.argmax(x @ rng.normal(size=(3, 3)), axis=1)
    res = train_encrypted(x, y, "logistic", epochs=2, lr=4.0, ctx=gt_ctx)
    assert res.weights.shape == (3, 4)  # one model per class, intercept included
    np.testing.assert_allclose(res.weights, train_plaintext(x, y, "logistic", epochs=2, lr=4.0), atol=5e-3)
    t = x @ np.array([0.5, -1.0, 0.25]) + 0.1
    lin = train_encrypted(x, t, "linear", epochs=2, lr=0.5, ctx=gt_ctx)
    np.testing.assert_allclose(lin.weights, train_plaintext(x, t, "linear", epochs=2, lr=0.5), atol=1e-3)


def test_the_protocol_in_bytes(cancer):
    x, y, _, _ = cancer
    owner = DataOwner(x[:100], y[:100])
    setup = owner.setup()
    assert isinstance(setup, bytes)
    party = ComputeParty(setup, lr=1.0)
    assert not party.ctx.has_secret_key()  # the compute party cannot decrypt anything
    message = party.step()
    assert message is not None and party.needs_refresh
    with pytest.raises(KeyMismatchError, match="no levels left"):
        party.step()
    with pytest.raises(KeyMismatchError, match="expected a training weights message, got 'setup'"):
        owner.refresh(setup)  # the owner decrypts weights messages only
    party.receive(owner.refresh(message))
    assert owner.refreshes == 1 and not party.needs_refresh
    assert party.step() is not None
    w = owner.finish(party.weights_message())
    np.testing.assert_allclose(w, train_plaintext(x[:100], y[:100], "logistic", epochs=2, lr=1.0), atol=5e-3)


def test_messages_from_another_owner_refused(cancer, gt_ctx):
    x, y, _, _ = cancer
    a, b = DataOwner(x[:50], y[:50]), DataOwner(x[:50], y[:50], ctx=gt_ctx)
    party = ComputeParty(a.setup())
    with pytest.raises(KeyMismatchError, match="another CKKS context"):
        b.refresh(party.step())
    with pytest.raises(KeyMismatchError, match="truncated"):
        ComputeParty(a.setup()[:-5])


def test_too_shallow_a_context_is_refused(cancer):
    import gravel.tensor as gt
    from gravel.errors import DepthError

    owner = DataOwner(cancer[0][:20], cancer[1][:20], ctx=gt.Context(depth=2, rotations=None))
    with pytest.raises(DepthError, match=r"one logistic step needs depth 4.*has 2"):
        ComputeParty(owner.setup())


def test_bad_training_input(cancer):
    x, y, _, _ = cancer
    with pytest.raises(InputError, match="one per sample"):
        DataOwner(x, y[:-1])
    with pytest.raises(InputError, match="two classes"):
        DataOwner(x[:10], np.zeros(10))
    with pytest.raises(InputError, match="task must be"):
        train_plaintext(x, y, "svm", epochs=1)
    with pytest.raises(InputError, match="epochs"):
        train_encrypted(x, y, epochs=0)
