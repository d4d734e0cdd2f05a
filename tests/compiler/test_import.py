import numpy as np
import pytest
import torch
from torch import nn

from gravel.compiler import float_forward, load_model_ops
from gravel.compiler.ops import ActOp, ConvOp, FlattenOp, LinearOp, PoolOp
from gravel.errors import ModelError
from gravel.model import build_model


def test_sequential_float_cnn_ops_and_forward_match_torch():
    model, _ = build_model("float-cnn", (1, 8, 8), 10)
    model.eval()
    ops, _ = load_model_ops(model)
    assert [type(o) for o in ops] == [ConvOp, type(ops[1]), ActOp, PoolOp, FlattenOp, LinearOp]
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    expected = model(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(float_forward(ops, x), expected, atol=1e-4)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


class WithMaxPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x))


class FunctionalChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_unsupported_operator_named_with_layer():
    with pytest.raises(ModelError, match=r"MaxPool2d at layer 'pool'"):
        load_model_ops(WithMaxPool())


def test_branches_refused():
    with pytest.raises(ModelError, match="single chain"):
        load_model_ops(Branchy())


def test_functional_forward_is_traced():
    ops, _ = load_model_ops(FunctionalChain())
    assert [type(o) for o in ops] == [FlattenOp, LinearOp, ActOp, LinearOp]


def test_onnx_import_matches_torch(tmp_path):
    model, _ = build_model("float-mlp", (1, 8, 8), 10, hidden=[16])
    model.eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)
    ops, info = load_model_ops(path)
    assert info["source"] == "onnx"
    x = np.random.default_rng(1).random((4, 1, 8, 8)).astype(np.float32)
    assert np.allclose(float_forward(ops, x), model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def test_onnx_unsupported_operator_named(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Sigmoid())
    path = tmp_path / "s.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)
    with pytest.raises(ModelError, match=r"unsupported ONNX operator Sigmoid at node"):
        load_model_ops(path)


def test_onnx_garbage_file(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        load_model_ops(path)
