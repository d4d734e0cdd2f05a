"""nn.Module import into the graph IR: the corpus through torch.fx, functional and module
coverage, Gravel's QAT layers, the ONNX fallback and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gravel.compiler.ir import evaluate
from gravel.compiler.torch_import import graph_from_torch
from gravel.errors import ModelError
from gravel.model import build_model
from tests.compiler.corpus import CORPUS, digits_batch


def _check(model: nn.Module, x: np.ndarray, fx_only: bool = True):
    """Import, compare with torch on `x`; `fx_only`: no ONNX fallback was needed."""
    model.eval()
    graph = graph_from_torch(model, torch.from_numpy(x[:2]))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(evaluate(graph, x), want, atol=1e-4, rtol=1e-4)
    if fx_only:
        assert graph.notes == []
    return graph


@pytest.mark.parametrize("arch", CORPUS, ids=lambda a: a.name)
def test_corpus_traces_with_fx_and_matches_torch(arch):
    graph = _check(arch.model(), digits_batch(32, arch.flat))
    assert graph.input_shape == arch.input_shape
    assert all(n.source for n in graph.nodes)


class Functional(nn.Module):
    """Functional forms and methods the corpus does not use."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3, generator=g) * 0.4)
        self.b = nn.Parameter(torch.randn(4, generator=g) * 0.1)
        self.register_buffer("mean", torch.randn(4, generator=g) * 0.2)
        self.register_buffer("var", torch.rand(4, generator=g) + 0.5)
        self.slope = nn.Parameter(torch.rand(4, generator=g) * 0.3)
        self.fc_w = nn.Parameter(torch.randn(10, 4 * 2 * 2 + 4, generator=g) * 0.3)

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, stride=1, padding=1)
        y = F.batch_norm(y, self.mean, self.var, training=False, eps=1e-3)
        y = F.prelu(y, self.slope)
        y = F.leaky_relu(y, 0.2) + F.elu(y, alpha=0.5) - F.gelu(y, approximate="tanh")
        y = F.softplus(y, beta=2.0) + F.hardtanh(y, -0.3, 0.3) + F.relu6(y) * torch.clamp(y, min=-0.1)
        y = F.hardsigmoid(y) + F.hardswish(y) + F.silu(y) + F.mish(y) + F.softsign(y) + F.selu(y)
        y = y + F.celu(y, 0.7) + y.pow(3) * 0.01 + y**2 - torch.square(y).neg() * 0.1 + 2 / (y.abs() + 1)
        y = torch.add(y, torch.sigmoid(y), alpha=2) - (1 - torch.tanh(y)) * torch.reciprocal(y.abs() + 1)
        y = F.dropout(y, 0.5, training=self.training).contiguous().float()
        g = y.mean((2, 3), keepdim=False)  # (N, 4)
        p = F.max_pool2d(y, 2, 2) + F.avg_pool2d(y, 3, 2, 1, count_include_pad=False)  # (N, 4, 4, 4)
        p = F.adaptive_avg_pool2d(p, 2) + F.adaptive_max_pool2d(p, (2, 2))  # (N, 4, 2, 2)
        z = torch.cat([p.view(p.size(0), -1), g], dim=-1)
        return F.softmax(F.linear(z, self.fc_w), dim=-1)


def test_functional_forms_and_methods():
    _check(Functional(), digits_batch(16))


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(5, 5)
        self.fc = nn.Linear(90, 10)

    def forward(self, x):
        y = F.pad(x, (0, 1, 2, 0), value=-0.5)  # (N, 1, 10, 9)
        y = torch.transpose(y, 2, 3).unflatten(3, (2, 5))  # (N, 1, 9, 2, 5)
        y = y.permute(0, 1, 3, 2, 4).reshape(y.shape[0], 18, 5)  # (N, 18, 5)
        y = self.mix(y.unsqueeze(1).squeeze(1))  # a linear map on the last axis of (18, 5)
        y = torch.relu(y.swapaxes(1, 2)).contiguous()  # (N, 5, 18)
        return self.fc(torch.flatten(y, 1).view(-1, 90))


def test_shape_functions_and_methods():
    graph = _check(Shapes(), digits_batch(8))
    assert [n.op for n in graph.nodes].count("transpose") == 3


def test_modules_beyond_the_corpus():
    model = nn.Sequential(
        nn.ZeroPad2d((1, 0, 2, 1)), nn.ConstantPad2d(1, 0.3),  # (1, 13, 11)
        nn.Conv2d(1, 3, 3, padding="valid"), nn.BatchNorm2d(3, affine=False),  # (3, 11, 9)
        nn.Conv2d(3, 4, 3, padding="same", dilation=2, bias=False), nn.Softplus(beta=2.0),
        nn.AdaptiveMaxPool2d(1), nn.Dropout(0.3), nn.Identity(), nn.Flatten(),
        nn.Unflatten(1, (2, 2)), nn.Flatten(), nn.LogSoftmax(dim=1),
    )
    model.eval()
    graph = graph_from_torch(model, torch.zeros(1, 1, 8, 8))
    x = digits_batch(8)
    with torch.no_grad():
        logits = model[:-1](torch.from_numpy(x)).numpy()
    # LogSoftmax is a softmax node flagged `log` (the compiler drops it when final: same argmax)
    z = logits - logits.max(axis=1, keepdims=True)
    np.testing.assert_allclose(evaluate(graph, x), z - np.log(np.exp(z).sum(axis=1, keepdims=True)), atol=1e-5)
    assert graph.nodes[-1].attrs == {"axis": 0, "log": True}


@pytest.mark.parametrize("arch", ["mlp", "bnn-mlp", "cnn"])
def test_qat_layers_become_quantizer_attributes(arch):
    model, options = build_model(arch, (1, 8, 8), 10)
    graph = graph_from_torch(model, torch.zeros(1, 1, 8, 8))
    assert graph.input.attrs["bits"] == options["in_bits"]
    weighted = [n for n in graph.nodes if n.op in ("gemm", "conv")]
    acts = [n for n in graph.nodes if n.op == "act"]
    if arch == "bnn-mlp":
        assert {n.attrs["w_bits"] for n in weighted} == {1}
        assert {(n.attrs["fn"], n.attrs["bits"]) for n in acts} == {("sign", 1)}
        # binarized: the real weights are kept, the quantizer binarizes them
        assert not np.all(np.isin(weighted[0].attrs["weight"], (-1.0, 1.0)))
    else:
        assert {n.attrs["w_bits"] for n in weighted} == {options["w_bits"]}
        assert {(n.attrs["fn"], n.attrs["bits"]) for n in acts} == {("relu", options["a_bits"])}
        relus = [m for m in model.modules() if type(m).__name__ == "QuantReLU"]
        assert [n.attrs["clip"] for n in acts] == [float(m.clip.detach().abs()) + 1e-3 for m in relus]


def test_input_quant_must_come_first():
    from gravel.model.quant import InputQuant

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), InputQuant(2))
    with pytest.raises(ModelError, match="InputQuant must be applied to the model's input"):
        graph_from_torch(model, torch.zeros(1, 1, 8, 8))


class DataControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 0:  # fx cannot trace this
            x = x * 2
        return self.fc(torch.rsqrt(x + 1))


class Unmapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.rsqrt(x.flatten(1) + 1))  # no mapping for rsqrt: ONNX has Sqrt, Reciprocal


def test_untraceable_or_unmapped_models_go_through_onnx():
    x = digits_batch(8)
    graph = _check(DataControlFlow(), x, fx_only=False)
    assert "ONNX export" in graph.notes[0] and "control flow" in graph.notes[0]
    assert "traced the path the sample input took" in graph.notes[1]
    graph = _check(Unmapped(), x, fx_only=False)
    assert graph.notes == ["imported through an in-memory ONNX export: Gravel does not map 'rsqrt' (rsqrt)"]


class QatUnmapped(nn.Module):
    def __init__(self):
        super().__init__()
        from gravel.model.quant import QuantReLU

        self.fc = nn.Linear(64, 8)
        self.act = QuantReLU(3)

    def forward(self, x):
        return torch.rsqrt(self.act(self.fc(x.flatten(1))) + 1)


def test_qat_model_is_never_exported_to_onnx():
    with pytest.raises(ModelError, match=r"QAT layers \(QuantReLU\).*would lose"):
        graph_from_torch(QatUnmapped(), torch.zeros(1, 1, 8, 8))


class Slicing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(x[:, 0, :3].flatten(1))


def test_fallback_errors_say_both_routes():
    with pytest.raises(ModelError, match=r"(?s)does not map .*getitem.*through an ONNX export instead.*Slice"):
        graph_from_torch(Slicing(), torch.zeros(1, 1, 8, 8))


class TwoProblems(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")
        self.pool = nn.AvgPool2d(2, divisor_override=3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_every_problem_is_listed_at_once():
    with pytest.raises(ModelError, match="2 operations") as info:
        graph_from_torch(TwoProblems(), torch.zeros(1, 1, 8, 8))
    msg = str(info.value)
    assert "layer 'conv' (Conv2d): padding_mode='reflect'" in msg
    assert "layer 'pool' (AvgPool2d): average pooling with divisor_override" in msg


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.view(2, -1)


class DataValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * x.flatten(1).relu().sum().item()


class TwoArgs(nn.Module):
    def forward(self, x, y):
        return x + y


class DefaultArg(nn.Module):
    def forward(self, x, scale=2.0, mask=None):
        return x * scale if mask is None else x


def test_bad_models_and_samples():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ModelError, match="does not keep the batch axis first"):
        graph_from_torch(FixedBatch(), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ModelError, match="more than one input"):
        graph_from_torch(TwoArgs(), x)
    assert graph_from_torch(DefaultArg(), x).nodes[-1].attrs["scale"].item() == 2.0
    with pytest.raises(ModelError, match="batch axis first"):
        graph_from_torch(nn.ReLU(), torch.zeros(5))
    with pytest.raises(ModelError, match="tensor or numpy array"):
        graph_from_torch(nn.ReLU(), [[1.0, 2.0]])
    with pytest.raises(ModelError, match="fails on the sample input"):
        graph_from_torch(nn.Linear(3, 2), x)
    with pytest.raises(ModelError, match="torch.nn.Module"):
        graph_from_torch("model.pt", x)


def test_item_is_refused_or_traced_with_a_warning():
    graph = graph_from_torch(DataValue(), torch.rand(1, 1, 8, 8))
    assert any("Python number" in note for note in graph.notes)


def test_mode_is_restored_and_weights_are_copies():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    graph = graph_from_torch(model, torch.zeros(1, 1, 8, 8))
    assert model.training
    gemm = graph.nodes[2]
    before = gemm.attrs["weight"].copy()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    np.testing.assert_array_equal(gemm.attrs["weight"], before)
