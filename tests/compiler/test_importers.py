"""load_graph_model: checkpoints, ONNX files and nn.Modules to one graph entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gravel.compiler.importers import load_graph_model
from gravel.compiler.ir import evaluate
from gravel.errors import ModelError
from gravel.model import Checkpoint, build_model, save_checkpoint


def test_checkpoint_keeps_its_description_and_qat_attributes(tmp_path):
    model, options = build_model("mlp", (1, 8, 8), 10, hidden=[16])
    path = tmp_path / "m.pt"
    save_checkpoint(Checkpoint("mlp", options, (1, 8, 8), 10, "digits", model), path)
    graph, info = load_graph_model(path)
    assert info == {"name": "m", "source": "checkpoint", "arch": "mlp", "options": options, "dataset": "digits"}
    assert graph.input_shape == (1, 8, 8) and graph.input.attrs["bits"] == options["in_bits"]
    with pytest.raises(ModelError, match=r"declares input shape \(1, 8, 8\).*\(64,\) was given; reshape"):
        load_graph_model(path, (64,))


def test_onnx_file_and_module_with_shape_or_batch(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh()).eval()
    path = tmp_path / "t.onnx"
    torch.onnx.export(model, (torch.zeros(1, 64),), str(path), dynamo=False)
    x = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    want = model(torch.from_numpy(x)).detach().numpy()
    graph, info = load_graph_model(path)
    assert info == {"name": "t", "source": "onnx"} and graph.input_shape == (64,)
    np.testing.assert_allclose(evaluate(graph, x), want, atol=1e-5)
    with pytest.raises(ModelError, match=r"declares input shape \(64,\) per sample, but \(3,\) was given$"):
        load_graph_model(path, (3,))
    for sample in ((64,), torch.zeros(2, 64), np.zeros((1, 64), np.float32)):
        graph, info = load_graph_model(model, sample)
        assert info == {"name": "Sequential", "source": "torch"}
        np.testing.assert_allclose(evaluate(graph, x), want, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ModelError, match="needs its input shape"):
        load_graph_model(nn.ReLU())
    with pytest.raises(ModelError, match="positive dimensions"):
        load_graph_model(nn.ReLU(), (0, 3))
    with pytest.raises(ModelError, match="no such model file"):
        load_graph_model("missing.onnx")
    with pytest.raises(ModelError, match="expected a checkpoint or ONNX path"):
        load_graph_model(42)
