"""`gravel check`'s backend advice: CKKS for a polynomial network's batches, TFHE where CKKS
cannot run the model, each with its reason."""

from torch import nn

from gravel.harness.check import check, format_check
from tests.ckks.conftest import train_digits_mlp


def test_a_square_mlp_batch_is_advised_ckks(digits):
    model = train_digits_mlp(digits, "square")
    r = check(model, digits, samples=200, sim_samples=0, fhe_samples=0, advice=True, batch=1000, progress=False)
    a = r["backends"]
    assert a["recommended"] == "ckks" and "1000 samples" in a["why"]
    assert a["ckks"]["supported"] and a["ckks"]["exact"] and a["ckks"]["depth"] == 3
    assert a["ckks"]["latency_s"] > 0 and a["ckks"]["time_s"] < a["concrete"]["time_s"]
    assert abs(a["ckks"]["accuracy"] - r["accuracy_float"]) <= 0.01
    assert "backend for batches of 1000: ckks" in format_check(r)


def test_max_pooling_is_advised_tfhe_with_the_reason(digits):
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64, 10)).eval()
    r = check(cnn, digits, samples=50, sim_samples=0, fhe_samples=0, advice=True, progress=False)
    a = r["backends"]
    assert a["recommended"] == "concrete" and not a["ckks"]["supported"]
    assert "maxpool" in a["ckks"]["reason"] and "average pooling" in a["why"]
