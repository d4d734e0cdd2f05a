import numpy as np
import pytest

from gravel.compiler.ir import Graph, Node, evaluate
from gravel.compiler.passes import Pass, canonicalise, run_passes
from gravel.errors import ModelError
from tests.compiler.graphs import mlp, residual_cnn


def test_canonical_graph_computes_the_same_with_fewer_nodes():
    rng = np.random.default_rng(0)
    g = residual_cnn(rng)
    x = rng.random((5, 1, 8, 8))
    c = canonicalise(g)
    ops = [n.op for n in c.nodes]
    assert "affine" not in ops and "softmax" not in ops  # normalisation and batch norm folded
    assert any("final Softmax" in note for note in c.notes)
    ref = evaluate(g, x)
    logits = evaluate(c, x)
    assert np.array_equal(ref.argmax(1), logits.argmax(1))
    # the softmax is gone, the logits before it are what the canonical graph computes
    assert np.allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), ref, atol=1e-9)


def test_shift_before_padded_conv_becomes_a_per_position_bias():
    rng = np.random.default_rng(1)
    g = residual_cnn(rng)
    c = canonicalise(g)
    c1 = c.node("c1")
    assert c1.attrs["bias"].shape == (4, 8, 8)  # the border sees the zero padding, not the shift
    x = rng.random((3, 1, 8, 8))
    g.output = "b1"
    c.output = "c1"
    # c1 in the canonical graph computes batch norm's output, normalisation and all folded in
    assert np.allclose(evaluate(c, x), evaluate(g, x), atol=1e-9)


@pytest.mark.parametrize("pattern", ["square", "silu", "gelu_erf"])
def test_univariate_subgraphs_fuse_into_one_lookup(pattern):
    rng = np.random.default_rng(2)
    g = mlp(rng, dict(fn="relu"))
    a1 = g.node("a1")
    if pattern == "square":
        extra = [Node("sq", "mul", ("fc1", "fc1"))]
    elif pattern == "silu":
        extra = [Node("sg", "act", ("fc1",), dict(fn="sigmoid")), Node("sq", "mul", ("fc1", "sg"))]
    else:  # 0.5 * x * (1 + erf(x / sqrt 2)), as opset-17 exporters write Gelu
        extra = [
            Node("d", "affine", ("fc1",), dict(scale=1 / np.sqrt(2), shift=0.0)),
            Node("e", "act", ("d",), dict(fn="erf")),
            Node("p", "affine", ("e",), dict(scale=1.0, shift=1.0)),
            Node("m", "mul", ("fc1", "p")),
            Node("sq", "affine", ("m",), dict(scale=0.5, shift=0.0)),
        ]
    k = g.nodes.index(a1)
    g.nodes[k : k + 1] = extra
    g.node("fc2").inputs = ("sq",)
    g.check()
    c = canonicalise(g)
    assert [n.op for n in c.nodes] == ["input", "gemm", "act", "gemm"]
    x = rng.random((7, 64))
    assert np.allclose(evaluate(c, x), evaluate(g, x), atol=1e-9)
    if pattern == "gelu_erf":
        gelu = mlp(rng, dict(fn="gelu"))
        for n in ("fc1", "fc2"):
            gelu.node(n).attrs = g.node(n).attrs
        assert np.allclose(evaluate(c, x), evaluate(gelu, x), atol=1e-9)


def test_inner_softmax_refused_with_pass_and_node():
    rng = np.random.default_rng(3)
    g = mlp(rng, dict(fn="relu"))
    g.nodes.insert(2, Node("sm", "softmax", ("fc1",), dict(axis=0), source="/inner/Softmax"))
    g.node("a1").inputs = ("sm",)
    with pytest.raises(ModelError, match=r"pass 'drop_final_softmax' failed.*'/inner/Softmax'"):
        canonicalise(g)


def test_failing_pass_names_itself_and_those_before():
    def broken(g: Graph) -> Graph:
        g = g.copy()
        g.output = "nowhere"
        return g

    rng = np.random.default_rng(4)
    with pytest.raises(ModelError, match=r"pass 'broken' failed \(after: first\).*nowhere"):
        run_passes(mlp(rng, dict(fn="relu")), [Pass("first", lambda g: g), Pass("broken", broken)])
