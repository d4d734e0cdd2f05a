import numpy as np
import pytest

from gravel.compiler import QuantConfig, compile_program, load_model_ops, make_plan, quantize
from gravel.compiler.quantize import signed_width
from gravel.errors import ModelError
from gravel.harness.check import simulate
from gravel.model import build_model, train


def test_signed_width():
    assert signed_width(-8, 7) == 4
    assert signed_width(0, 8) == 5
    assert signed_width(-9, 0) == 5


def test_qat_model_quantizes_faithfully(digits, digits_model):
    import torch

    model, _, _ = digits_model
    ops, _ = load_model_ops(model)
    torch_pred = model.eval()(torch.from_numpy(digits.x_test)).argmax(1).numpy()
    # Without accumulator rounding the integer graph is the QAT model up to tie-breaking.
    exact = quantize(ops, digits.x_train[:300], QuantConfig(tlu_bits=16))
    assert (exact.predict(digits.x_test) == torch_pred).mean() > 0.97
    # Rounding accumulators to 5 bits costs little accuracy.
    graph = quantize(ops, digits.x_train[:300])
    acc_torch = (torch_pred == digits.y_test).mean()
    assert (graph.predict(digits.x_test) == digits.y_test).mean() > acc_torch - 0.05
    assert graph.input_bits == 2
    assert all(s.act is None or s.act.bits == 3 for s in graph.stages)


def test_bnn_thresholds_are_exact(digits):
    """Batch norm + sign folded into integer thresholds: same predictions as the float BNN."""
    from gravel.compiler import float_forward

    model, _ = build_model("bnn-mlp", digits.image_shape, 10, hidden=[32, 32])
    train(model, digits, epochs=3, progress=False)
    ops, _ = load_model_ops(model.eval())
    graph = quantize(ops, digits.x_train[:300], QuantConfig(tlu_bits=16))
    float_pred = float_forward(ops, digits.x_test).argmax(1)
    assert (graph.predict(digits.x_test) == float_pred).mean() >= 0.99
    assert [s.act.kind for s in graph.stages[:-1]] == ["sign", "sign"]


@pytest.mark.parametrize("arch", ["mlp", "cnn", "bnn-mlp", "float-mlp"])
def test_simulated_program_agrees_with_clear_reference(digits, arch):
    kw = {"hidden": [16]} if "mlp" in arch else {}
    model, _ = build_model(arch, digits.image_shape, 10, **kw)
    train(model, digits, epochs=10, lr=1e-2, progress=False)
    ops, _ = load_model_ops(model.eval())
    calib = digits.x_train[:200]
    graph = quantize(ops, calib)
    plan = make_plan(graph, 4)
    # p_error 1e-4: this tests the program against the reference, not the backend's error rate
    module = compile_program(graph, plan, calib, p_error=1e-4, simulation=True)
    x = digits.x_test[:60]
    # Approximate rounding may move an accumulator by one step; near-ties can flip.
    agreement = (simulate(module, graph, plan, x) == graph.predict(x)).mean()
    assert agreement >= 0.85


def test_plan_gives_16_way_parallelism_for_reference_mlp():
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    ops, _ = load_model_ops(model)
    graph = quantize(ops, np.random.default_rng(0).random((20, 1, 28, 28)))
    plan = make_plan(graph)
    assert [s.shards for s in plan.stages] == [16, 16, 1]
    assert plan.pbs_count == 128 + 64
    assert all(s.pbs_per_shard == s.shard_size for s in plan.stages[:2])


def test_layer_order_errors():
    from gravel.compiler.ops import ActOp, LinearOp

    x = np.zeros((2, 1, 2, 2))
    with pytest.raises(ModelError, match="must follow a Linear or Conv2d"):
        quantize([ActOp("relu", None, None, "r")], x)
    with pytest.raises(ModelError, match="needs a flat input"):
        quantize([LinearOp(np.ones((3, 4)), np.zeros(3), None, "fc")], x)
