"""gt.nn.from_pytorch: converted models against the float model, with only the keys they need."""

import pytest
import torch

import gravel.tensor as gt
from gravel.errors import ModelError


def small_cnn():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), gt.nn.PolyActivation.square(),
        torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Dropout(0.1), torch.nn.Linear(3 * 4 * 4, 10),
    )
    bn = m[1]
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    return m


def test_cnn_with_exact_keys_matches_float_model():
    model, x = small_cnn(), torch.rand(2, 1, 8, 8)
    module = gt.nn.from_pytorch(model, x)
    assert module.depth == 4  # conv+bn (folded) 1, square 1, pool 1, linear 1
    ctx = module.context()
    assert set(ctx.keys.rotation_steps) == set(module.rotation_steps)  # only what the maps use
    report = module.check(ctx, x)
    assert report.max_abs_error < 1e-3
    assert report.agreement == 1.0
    assert report.output_shape == (2, 10)
    assert "encrypted vs float" in str(report)


def test_fx_traced_module_and_report_in_from_pytorch(gt_ctx):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(12, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            x = torch.flatten(x, 1)
            h = self.fc1(x)
            return self.fc2(h * h)

    x = torch.rand(3, 3, 4)
    module = gt.nn.from_pytorch(Net(), x, gt_ctx)  # power-of-two keys compose any rotation
    assert module.depth == 3
    assert module.report.max_abs_error < 1e-3


def test_unsupported_layers_named():
    with pytest.raises(ModelError, match=r"1: ReLU is not supported.*replace_activations"):
        gt.nn.from_pytorch(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), torch.ones(1, 4))
    with pytest.raises(ModelError, match="MaxPool2d is not supported"):
        gt.nn.from_pytorch(torch.nn.Sequential(torch.nn.MaxPool2d(2)), torch.ones(1, 1, 4, 4))


def test_replace_activations_gives_a_convertible_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    poly = gt.nn.replace_activations(model, -4, 4, degree=2)
    assert isinstance(poly[1], gt.nn.PolyActivation) and isinstance(model[1], torch.nn.ReLU)
    module = gt.nn.from_pytorch(poly, torch.rand(2, 4))
    assert module.depth == 4  # a non-integer x^2 coefficient: (c x) x, two levels
