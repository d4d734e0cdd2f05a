"""Canonical graph -> CKKS program: linear blocks multiplied out, polynomials folded, depth
planned, 128-bit parameters chosen, or a clear error."""

import numpy as np
import pytest

from gravel.ckks.compile import CkksOptions, compile_ckks
from gravel.errors import DepthError, ModelError


def test_square_model_compiles_exactly(digits, sq_model, sq_float_logits):
    compiled, _ = compile_ckks(sq_model, digits.x_train[:200], digits.y_train[:200])
    prog = compiled.program
    assert compiled.report["exact"] and compiled.notes == []
    # gemm, x^2 (one level, monic), gemm
    assert prog.depth == 3 and [st.poly for st in prog.stages] == [(0.0, 0.0, 1.0), None]
    assert prog.params.depth >= 3 and prog.params.total_bits <= 218
    np.testing.assert_allclose(prog.simulate(digits.x_test[:64]), sq_float_logits, rtol=1e-5, atol=1e-4)
    assert prog.single_kind == "replicated" and prog.output_slots == list(range(10))


def test_relu_is_replaced_and_its_cost_reported(digits, relu_model):
    compiled, _ = compile_ckks(relu_model, digits.x_train[:300], digits.y_train[:300],
                               CkksOptions(degree=2))
    r = compiled.report
    assert not r["exact"] and compiled.polys[0].degree == 2
    assert "accuracy_polynomial" in r and r["accuracy_float"] - r["accuracy_polynomial"] < 0.05
    assert any("polynomial activations on 300 calibration samples" in n for n in compiled.notes)
    # the leading coefficient is folded away: the encrypted polynomial is monic, no constant
    poly = compiled.program.stages[0].poly
    assert poly[0] == 0.0 and poly[-1] == 1.0 and compiled.program.depth == 3


def test_too_deep_a_model_names_its_depth_and_the_maximum(digits):
    import torch
    from torch import nn

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    layers = [nn.Flatten(), nn.Linear(64, 8)]
    for _ in range(12):
        layers += [Square(), nn.Linear(8, 8)]
    torch.manual_seed(0)
    model = nn.Sequential(*layers, nn.Linear(8, 10)).eval()  # the last two gemms merge: depth 13 + 12
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    with pytest.raises(DepthError, match=r"needs multiplicative depth 25 .*allow \d+"):
        compile_ckks(model, digits.x_train[:20])


def test_max_pooling_is_refused_by_name(digits):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 10)).eval()
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="max is not a polynomial"):
        compile_ckks(model, digits.x_train[:20])


def test_conv_and_avgpool_are_multiplied_out(digits):
    import torch
    from torch import nn

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), Square(), nn.Flatten(),
                          nn.Linear(18, 10)).eval()
    compiled, _ = compile_ckks(model, digits.x_train[:50])
    with torch.no_grad():
        ref = model(torch.tensor(digits.x_test[:8])).numpy()
    np.testing.assert_allclose(compiled.program.simulate(digits.x_test[:8]), ref, rtol=1e-5, atol=1e-5)
    assert compiled.program.depth == 3
