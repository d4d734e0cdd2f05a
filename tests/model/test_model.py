import pytest
import torch

from gravel.errors import ModelError
from gravel.model import (
    Checkpoint,
    InputQuant,
    QuantReLU,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from gravel.model.quant import quantize_weight


def test_quantizers_use_few_levels_and_pass_gradients():
    w = torch.randn(32, 16, requires_grad=True)
    q = quantize_weight(w, 3)
    assert len(torch.unique(q.detach())) <= 7
    q.sum().backward()
    assert w.grad is not None and torch.all(w.grad == 1)
    x = torch.rand(100)
    assert len(torch.unique(InputQuant(2)(x))) <= 4
    act = QuantReLU(3, init_clip=2.0)
    y = act(torch.linspace(-3, 3, 200))
    assert y.min() == 0 and y.max() <= 2.0 + 1e-3 and len(torch.unique(y.detach())) <= 8


def test_bnn_weights_and_activations_are_binary():
    model, _ = build_model("bnn-mlp", (1, 8, 8), 10, hidden=[16])
    model.eval()
    out = model[:5](torch.rand(4, 1, 8, 8))  # input quant, flatten, linear, bn, sign
    assert set(torch.unique(out).tolist()) <= {-1.0, 1.0}


def test_training_learns_digits(digits_model):
    _, _, metrics = digits_model
    assert metrics["test_accuracy"] > 0.8


def test_checkpoint_round_trip(tmp_path, digits, digits_model):
    model, options, metrics = digits_model
    path = tmp_path / "m.pt"
    save_checkpoint(Checkpoint("mlp", options, digits.image_shape, 10, "digits", model, metrics), path)
    ckpt = load_checkpoint(path)
    assert ckpt.arch == "mlp" and ckpt.options == options and ckpt.dataset == "digits"
    x = torch.from_numpy(digits.x_test[:20])
    assert torch.equal(ckpt.model(x), model.eval()(x))


def test_bad_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable Gravel checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"some": "dict"}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a Gravel checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_unknown_arch_and_options():
    with pytest.raises(ModelError, match="unknown architecture"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ModelError, match="no option"):
        build_model("mlp", (1, 8, 8), 10, depth=3)
    with pytest.raises(ModelError, match="outside 1..8"):
        build_model("mlp", (1, 8, 8), 10, w_bits=9)
