import numpy as np
import pytest

from gravel.compiler import QuantConfig, quantize
from gravel.compiler.ir import Graph, Node, evaluate
from gravel.compiler.passes import canonicalise
from gravel.compiler.plan import affine_map, make_plan, partition, plan_stages
from gravel.compiler.program import stage_outputs
from gravel.compiler.qgraph import signed_width
from gravel.errors import ModelError
from tests.compiler.graphs import conv_attrs, mlp, pooled_cnn, residual_cnn

FINE = QuantConfig(in_bits=6, w_bits=7, a_bits=7, tlu_bits=12)


def _agreement(g: Graph, x: np.ndarray, cfg: QuantConfig) -> float:
    c = canonicalise(g)
    q = quantize(c, x, cfg)
    return float((q.predict(x) == np.asarray(evaluate(c, x)).argmax(1)).mean())


def test_signed_width():
    assert signed_width(-8, 7) == 4
    assert signed_width(0, 8) == 5
    assert signed_width(-9, 0) == 5


def test_residual_join_uses_integer_multipliers_not_lookups():
    rng = np.random.default_rng(0)
    g = residual_cnn(rng)
    x = rng.random((200, 1, 8, 8))
    c = canonicalise(g)
    q = quantize(c, x)
    add = q.node("add")
    assert add.op == "add" and 1 in (add.attrs["ma"], add.attrs["mb"])
    assert not [n for n in q.nodes if n.name.endswith("_requant")] and not q.notes[1:]
    assert q.lookups == 4 * 64 * 2 + 4 * 16 * 3  # two ReLU maps, then 3 pairwise maxima per 2x2 window
    assert _agreement(g, x, FINE) >= 0.95


def test_stage_outputs_equal_the_clear_program_for_any_shard_count():
    rng = np.random.default_rng(1)
    g = residual_cnn(rng)
    x = rng.random((50, 1, 8, 8))
    q = quantize(canonicalise(g), x)
    stages = partition(q)
    xq = q.quantize_input(x)
    for shards in (1, 2, 4):
        plan = make_plan(stages, shards)
        out = stage_outputs(q, stages, plan, xq)[stages[-1].name][0]
        assert np.array_equal(out, q.forward_int(xq))
    assert [row.shards for row in make_plan(stages, 4).stages][:1] == [4]  # conv + relu shards
    # conv -> residual join -> relu shards too, each shard a function of its own that cuts its
    # channels out of the join's other operand
    join = make_plan(stages, 2).stages[1]
    assert [n.op for n in stages[1].nodes] == ["linear", "add", "lut"]
    assert join.shards == 2 and join.functions == ("stage1_0", "stage1_1")


def test_concat_of_branches_with_different_scales_is_free():
    rng = np.random.default_rng(2)
    nodes = [
        Node("x", "input"),
        Node("a", "conv", ("x",), conv_attrs(rng, 3, 1)),
        Node("ra", "act", ("a",), dict(fn="relu")),
        Node("b", "conv", ("x",), conv_attrs(rng, 2, 1, k=1, pads=(0, 0, 0, 0))),
        Node("tb", "act", ("b",), dict(fn="tanh")),
        Node("cat", "concat", ("ra", "tb"), dict(axis=0)),
        Node("c", "conv", ("cat",), conv_attrs(rng, 4, 5, group=1)),
        Node("gap", "avgpool", ("c",), dict(kernel=(8, 8), strides=(8, 8))),
        Node("fl", "reshape", ("gap",), dict(shape=(4,))),
        Node("fc", "gemm", ("fl",), dict(weight=rng.normal(0, 1, (3, 4)), bias=np.zeros(3))),
    ]
    g = Graph(nodes, "fc", (1, 8, 8))
    g.check()
    x = rng.random((200, 1, 8, 8))
    q = quantize(canonicalise(g), x)
    # the concat and the conv after it need no lookup (the pooled sum feeding the Gemm may: its
    # accumulator would be wider than concrete's 16 bits)
    assert not [n for n in q.nodes if "requant" in n.name and not n.name.startswith("fl")]
    assert _agreement(g, x, FINE) >= 0.95


def test_per_position_scale_before_a_conv_gets_a_noted_requantization():
    rng = np.random.default_rng(3)
    nodes = [
        Node("x", "input"),
        Node("p", "avgpool", ("x",), dict(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), count_include_pad=0)),
        Node("c", "conv", ("p",), conv_attrs(rng, 2, 1)),
        Node("fl", "reshape", ("c",), dict(shape=(128,))),
        Node("fc", "gemm", ("fl",), dict(weight=rng.normal(0, 1, (3, 128)), bias=np.zeros(3))),
    ]
    g = Graph(nodes, "fc", (1, 8, 8))
    g.check()
    x = rng.random((100, 1, 8, 8))
    q = quantize(canonicalise(g), x)
    assert any("requantizing table lookup" in note and "one positive scale per input channel" in note for note in q.notes)
    assert _agreement(g, x, FINE) >= 0.9


def test_binarized_layer_with_sign_is_exact_under_rounding():
    """Batch norm (negative scales too) + sign on binarized weights: exact integer thresholds."""
    rng = np.random.default_rng(4)
    h = 32
    nodes = [
        Node("x", "input", attrs={"bits": 2}),
        Node("fc1", "gemm", ("x",), dict(weight=np.sign(rng.normal(0, 1, (h, 64))), bias=np.zeros(h), w_bits=1)),
        Node("bn", "affine", ("fc1",), dict(scale=rng.uniform(-1, 1, h), shift=rng.normal(0, 2, h))),
        Node("s", "act", ("bn",), dict(fn="sign", bits=1)),
        Node("fc2", "gemm", ("s",), dict(weight=np.sign(rng.normal(0, 1, (10, h))), bias=np.zeros(10), w_bits=1)),
    ]
    g = Graph(nodes, "fc2", (64,))
    g.check()
    x = np.floor(rng.random((300, 64)) * 3 + 0.5) / 3  # already on the 2-bit grid
    c = canonicalise(g)
    q = quantize(c, x, QuantConfig(tlu_bits=3))
    assert q.node("s").attrs["lsbs"] > 0  # the accumulator really is rounded
    signs = np.sign(np.asarray(evaluate(c, x, keep=True)["s"]))
    ints = q.forward_int(q.quantize_input(x), keep=True)["s"]
    assert np.array_equal(2 * ints - 1, signs)


@pytest.mark.parametrize("fn", ["relu", "gelu", "tanh", "sigmoid", "leaky_relu", "square", "elu"])
def test_activation_families_keep_the_float_argmax(fn):
    rng = np.random.default_rng(5)
    g = mlp(rng, dict(fn=fn, params={"alpha": 0.1} if fn == "leaky_relu" else {}))
    x = rng.random((300, 64))
    assert _agreement(g, x, FINE) >= 0.95


def test_config_and_shape_errors_are_clear():
    with pytest.raises(ModelError, match="a_bits=9"):
        QuantConfig(a_bits=9)
    rng = np.random.default_rng(6)
    g = canonicalise(mlp(rng, dict(fn="relu")))
    with pytest.raises(ModelError, match=r"\(7,\) per sample does not fit the model's input \(64,\)"):
        quantize(g, np.zeros((3, 7)))
    assert quantize(g, rng.random((20, 1, 8, 8))).input_shape == (64,)  # same count: reshaped


def test_a_stage_with_per_channel_lookups_splits_into_shard_functions():
    """Output channels whose weights differ >4x get per-channel scales, so one lookup table per
    channel: such a stage splits into one compiled function per shard (weights and tables
    sliced), and the sharded program still computes exactly the clear program."""
    from gravel.compiler import lower
    from gravel.compiler.pipeline import build
    from gravel.harness.check import simulate

    rng = np.random.default_rng(3)
    g = mlp(rng, dict(fn="relu"))
    g.node("fc1").attrs["weight"][:4] *= 8.0  # four loud channels: per-channel weight scales
    x = rng.random((60, 64))
    cfg = QuantConfig(in_bits=4, w_bits=5, a_bits=4, tlu_bits=6, rounding="exact", search=False)
    compiled = build(g, x, cfg, max_shards=2)
    row = compiled.plan.stages[0]
    assert np.ndim(compiled.stages[0].body[-1].attrs["in_scale"]) == 1  # the lookup ending the body
    assert row.functions == ("stage0_0", "stage0_1") and row.shards == 2
    # the output Gemm folded into the shards: each returns its partial output, which add up
    assert len(compiled.stages) == 1 and row.partial
    xq = compiled.qgraph.quantize_input(x)
    out = stage_outputs(compiled.qgraph, compiled.stages, compiled.plan, xq)
    assert [o.shape for o in out["stage0"]] == [(60, 10), (60, 10)]
    assert np.array_equal(out["stage0"][0] + out["stage0"][1], compiled.qgraph.forward_int(xq))
    # the simulated backend program, shard function by shard function (no fused function)
    module = lower(compiled, x, p_error=1e-6, simulation=True, fused=False)
    assert compiled.plan.stages[0].functions == ("stage0_0", "stage0_1"), compiled.notes  # no fallback
    assert hasattr(module, "stage0_1") and not hasattr(module, "fused")
    assert np.array_equal(simulate(module, compiled, x[:10]), compiled.qgraph.predict(x[:10]))


def test_node_tlu_bits_widens_only_the_named_lookup():
    rng = np.random.default_rng(2)
    c = canonicalise(residual_cnn(rng))
    x = rng.random((100, 1, 8, 8))
    base = quantize(c, x, QuantConfig(tlu_bits=3, search=False))
    luts = [n for n in base.nodes if n.op == "lut" and n.attrs["lsbs"] >= 2]
    assert luts, "the narrow setting should round some accumulator"
    key = luts[0].name
    wide = quantize(c, x, QuantConfig(tlu_bits=3, search=False, node_tlu_bits=((key, 5),)))
    assert wide.node(key).attrs["lsbs"] == base.node(key).attrs["lsbs"] - 2
    # the others keep 3-bit lookups (their accumulators may move a little: the values upstream did)
    for n in wide.nodes:
        if n.op == "lut" and n.name != key and n.attrs["lsbs"]:
            assert n.attrs["acc_bits"] - n.attrs["lsbs"] == 3


def test_search_climbs_from_a_failing_start_and_keeps_what_it_promises():
    from gravel.compiler.pipeline import search_quantize

    rng = np.random.default_rng(3)
    c = canonicalise(mlp(rng, dict(fn="relu")))
    x = rng.random((300, 64))
    start = QuantConfig(in_bits=2, w_bits=3, a_bits=2, tlu_bits=3)
    reference = np.asarray(evaluate(c, x)).argmax(1)
    assert (quantize(c, x, start).predict(x) != reference).mean() > start.max_disagreement
    q, rung = search_quantize(c, x, start)
    flips = float((q.predict(x) != reference).mean())
    assert flips <= start.max_disagreement
    assert rung.tlu_bits > start.tlu_bits and rung.in_bits >= 4
    # a narrowed lookup takes an earlier rung's width, never more than the chosen rung's
    widths = {n.attrs["acc_bits"] - n.attrs["lsbs"] for n in q.nodes if n.op == "lut" and n.attrs["lsbs"]}
    assert widths and max(widths) <= rung.tlu_bits
    assert f"{rung.tlu_bits}-bit lookups" in q.notes[-1] and "wanted <= 3.0 %" in q.notes[-1]


def test_two_linear_operators_in_a_row_get_a_lookup_between_when_too_wide():
    """x @ R then L @ y with no activation between: the second accumulator multiplies the first
    one's range by its weights; past 16 bits concrete finds no parameters, so the quantizer
    requantizes the first result (one lookup per element) and says so."""
    from gravel.compiler.quantize import MAX_INTEGER_BITS

    rng = np.random.default_rng(4)
    nodes = [
        Node("x", "input"),
        Node("right", "gemm", ("x",), dict(weight=rng.normal(0, 1, (6, 8)), bias=np.zeros(6))),
        Node("t", "transpose", ("right",), dict(perm=(0, 2, 1))),
        Node("left", "gemm", ("t",), dict(weight=rng.normal(0, 1, (5, 8)), bias=np.zeros(5))),
        Node("fl", "reshape", ("left",), dict(shape=(30,))),
        Node("fc", "gemm", ("fl",), dict(weight=rng.normal(0, 1, (4, 30)), bias=np.zeros(4))),
    ]
    g = canonicalise(Graph(nodes, "fc", (1, 8, 8)))
    x = rng.random((200, 1, 8, 8))
    q = quantize(g, x, QuantConfig(in_bits=5, w_bits=8, a_bits=5, tlu_bits=7, search=False))
    assert max(signed_width(n.lo, n.hi) for n in q.nodes) <= MAX_INTEGER_BITS
    assert "t_requant" in [n.name for n in q.nodes if n.op == "lut"]
    assert any("accumulators (concrete's integers hold 16)" in note for note in q.notes)
    reference = np.asarray(evaluate(g, x)).argmax(1)
    assert (q.predict(x) == reference).mean() >= 0.9


def test_mixups_are_seeded_blends_within_the_calibration_range():
    from gravel.compiler.quantize import mixups

    x = np.random.default_rng(5).random((50, 1, 8, 8))
    a, b = mixups(x), mixups(x)
    assert a.shape == x.shape and np.array_equal(a, b)
    assert a.min() >= x.min() and a.max() <= x.max() and not np.allclose(a, x)


def test_search_rejects_a_rung_that_flips_blends_even_when_calibration_agrees():
    """A model sure of its calibration samples flips none of them at the cheapest rung; the
    blends between them still show what that rung loses."""
    from dataclasses import replace

    from gravel.compiler.pipeline import search_quantize

    rng = np.random.default_rng(3)
    c = canonicalise(mlp(rng, dict(fn="relu")))
    x = rng.random((300, 64))
    start = QuantConfig(in_bits=2, w_bits=3, a_bits=2, tlu_bits=3, max_disagreement=1.0)
    lenient = replace(start, max_mix_disagreement=1.0)
    _, cheap = search_quantize(c, x, lenient)
    assert cheap == lenient  # calibration flips alone let the cheapest rung through
    q, rung = search_quantize(c, x, replace(start, max_mix_disagreement=0.02))
    assert rung.tlu_bits > start.tlu_bits
    assert "of blends of them (wanted <= 2.0 %)" in q.notes[-1]


def test_lookups_of_step_functions_round_exactly_under_auto():
    """floor/round inside a fused activation jump a whole step when approximate rounding is one
    off; smooth activations keep the cheaper approximate rounding."""
    rng = np.random.default_rng(6)
    steps = [{"fn": "floor", "args": [0]}, {"fn": "tanh", "args": [0]}, {"fn": "add", "args": [1, 2]}]
    for fn, params, exact in (("composite", {"steps": steps}, True), ("round", {}, True), ("tanh", {}, False)):
        nodes = [
            Node("x", "input"),
            Node("fc1", "gemm", ("x",), dict(weight=rng.normal(0, 1, (16, 64)), bias=np.zeros(16))),
            Node("a", "act", ("fc1",), dict(fn=fn, params=params)),
            Node("fc2", "gemm", ("a",), dict(weight=rng.normal(0, 1, (4, 16)), bias=np.zeros(4))),
        ]
        g = canonicalise(Graph(nodes, "fc2", (64,)))
        q = quantize(g, rng.random((100, 64)) * 4, QuantConfig(search=False))
        luts = [n for n in q.nodes if n.op == "lut"]
        assert luts and all(n.attrs["exact"] is exact for n in luts), fn


def test_search_with_no_passing_rung_keeps_the_best_it_tried():
    from dataclasses import replace

    from gravel.compiler.pipeline import search_quantize

    rng = np.random.default_rng(3)
    c = canonicalise(mlp(rng, dict(fn="relu")))
    x = rng.random((300, 64))
    labels = np.asarray(evaluate(c, x)).argmax(1)
    impossible = replace(QuantConfig(in_bits=2, w_bits=3, a_bits=2, tlu_bits=3), max_loss=-1.0,
                         max_mix_disagreement=-1.0)
    q, rung = search_quantize(c, x, impossible, labels)
    assert rung in impossible.ladder() and "wanted <= -100.0 %" in q.notes[-1]


def test_a_lookup_free_output_stage_folds_into_the_split_stage_before_it():
    """Pooling, flatten and the final Gemm are one affine map of the last ReLU's output: split
    over 2 or 4 workers, each shard of that ReLU's stage returns its rows of it (the constant in
    shard 0), and the parts add up to the clear program's output exactly."""
    rng = np.random.default_rng(4)
    g = pooled_cnn(rng)
    x = rng.random((40, 1, 8, 8))
    q = quantize(canonicalise(g), x)
    xq = q.quantize_input(x)
    unfolded = partition(q)
    assert unfolded[-1].lookups == 0 and [n.op for n in unfolded[-1].nodes] == ["sumpool", "reshape", "linear"]
    for shards in (2, 4):
        stages, plan = plan_stages(q, shards)
        assert len(stages) == len(unfolded) - 1 and stages[-1].tail == 3
        last = plan.stages[-1]
        assert last.partial and last.shards == shards and len(last.functions) == shards
        parts = stage_outputs(q, stages, plan, xq)[stages[-1].name]
        assert len(parts) == shards
        assert np.array_equal(np.sum(parts, axis=0), q.forward_int(xq).reshape(len(x), -1))
    # one process: nothing to fold, the program is as partitioned
    stages, plan = plan_stages(q, 1)
    assert len(stages) == len(unfolded) and not plan.stages[-1].partial
    # the map is exact: sum over each channel's 64 positions, then the Gemm's column
    a, c = affine_map(unfolded[-2].output, unfolded[-1].nodes)
    gemm = unfolded[-1].nodes[-1]
    assert a.shape == (8 * 64, 10) and np.array_equal(a[::64], np.asarray(gemm.attrs["weight"]))


def test_output_stages_that_are_not_affine_or_read_more_stay_apart():
    rng = np.random.default_rng(5)
    # an output activation: the last stage ends at a lookup, nothing to fold or split
    g = mlp(rng, dict(fn="relu"))
    g = Graph([*g.nodes, Node("out", "act", ("fc2",), dict(fn="tanh"))], "out", (64,), "mlp_tanh_out")
    x = rng.random((40, 64))
    q = quantize(canonicalise(g), x, FINE)
    stages, plan = plan_stages(q, 2)
    assert [st.tail for st in stages] == [0, 0] and not plan.stages[-1].partial and plan.stages[-1].shards == 1
    # a residual CNN whose output stage reads a max-pooling stage (not split): no fold
    q = quantize(canonicalise(residual_cnn(rng)), rng.random((40, 1, 8, 8)))
    stages, plan = plan_stages(q, 2)
    assert len(stages) == len(partition(q)) and not plan.stages[-1].partial


def test_bias_correction_takes_back_the_mean_error_of_each_output():
    # coarse rounding and clipping shift the pooled features of a global-pooling CNN
    # systematically; each Gemm/Conv's bias takes back its outputs' mean error on calibration
    rng = np.random.default_rng(3)
    g = canonicalise(pooled_cnn(rng))
    x, held_out = rng.random((300, 1, 8, 8)), rng.random((300, 1, 8, 8))
    coarse = QuantConfig(in_bits=3, w_bits=4, a_bits=3, tlu_bits=5, search=False)
    from dataclasses import replace

    def mean_error(q, data):
        out = q.dequantize_output(q.forward_int(q.quantize_input(data)))
        return (out - np.asarray(evaluate(g, data)).reshape(len(data), -1)).mean(0)

    corrected = quantize(g, x, coarse)
    plain = quantize(g, x, replace(coarse, bias_correction=False))
    # on calibration, within half a step of the output's integers, per class
    assert np.all(np.abs(mean_error(corrected, x)) <= 0.5 * corrected.output_scale + 1e-9)
    before, after = np.abs(mean_error(plain, held_out)), np.abs(mean_error(corrected, held_out))
    assert before.max() > 4 * after.max(), (before, after)
    assert corrected.node("fc").attrs["bias"].tolist() != plain.node("fc").attrs["bias"].tolist()


def test_every_shard_is_a_function_of_its_own_with_only_encrypted_arguments():
    """A stage whose lookup is one table for all channels shards like any other: one function
    per shard with its constants compiled in. Clear weight arguments would let concrete bound
    their products' noise only by their bit width (the ResNet's whole key set went from 2- to
    3-level bootstraps), so no function takes any."""
    import json

    from gravel.compiler import lower
    from gravel.compiler.pipeline import build
    from gravel.harness.check import simulate

    rng = np.random.default_rng(4)
    g = mlp(rng, dict(fn="relu"))
    x = rng.random((60, 64))
    cfg = QuantConfig(in_bits=4, w_bits=5, a_bits=4, tlu_bits=6, search=False)
    compiled = build(g, x, cfg, max_shards=2)
    row = compiled.plan.stages[0]
    assert np.ndim(compiled.stages[0].body[-1].attrs["in_scale"]) == 0  # one table for all channels
    assert row.functions == ("stage0_0", "stage0_1") and "shardable" not in row.to_json()
    module = lower(compiled, x, p_error=1e-6, simulation=True)
    circuits = json.loads(module.client.specs.serialize())["circuits"]
    assert {c["name"] for c in circuits} >= {"stage0_0", "stage0_1", "fused"}
    for circuit in circuits:
        assert all("lweCiphertext" in arg["typeInfo"] for arg in circuit["inputs"]), circuit["name"]
    assert np.array_equal(simulate(module, compiled, x[:10]), compiled.qgraph.predict(x[:10]))
