"""Every corpus architecture through the whole compiler: imported from an ONNX export,
canonicalised, quantized, partitioned and lowered to a simulated concrete program that must
compute exactly what the clear integer program computes (exact rounding, tiny error rate, and
samples of the calibration set, whose integers are in the bounds concrete derived from it: this
tests the compiler, not the backend's noise nor held-out data beyond calibrated bounds, which
`gravel check` and benchmarks/corpus.py measure). The dynamo exporter's files go through the
same path for a few entries; benchmarks/corpus.py trains them all and reports accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from gravel.compiler import QuantConfig, build
from gravel.harness.check import simulate, simulation_model
from tests.compiler.corpus import CORPUS, digits_batch, export_onnx

EXACT = QuantConfig(rounding="exact", search=False)
DYNAMO = ("resnet_block", "concat_branches", "mlp_gelu_erf", "depthwise_separable")


@pytest.mark.parametrize("arch", CORPUS, ids=[a.name for a in CORPUS])
def test_corpus_compiles_and_simulation_equals_the_clear_program(arch, tmp_path):
    dynamo = arch.name in DYNAMO
    path = export_onnx(arch, dynamo, tmp_path / f"{arch.name}.onnx")
    x = digits_batch(300, flat=arch.flat)
    compiled = build(path, x, EXACT)
    one, module = simulation_model(compiled, x, p_error=1e-6)
    sim = simulate(module, one, x[::15])
    clear = compiled.qgraph.predict(x[::15])
    assert (sim == clear).mean() >= 0.95, compiled.graph.summary()
    assert compiled.qgraph.lookups > 0 and len(compiled.stages) >= 1
