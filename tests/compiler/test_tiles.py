"""Row tiles with a halo (compiler/tiles.py): merged convolutional stages, split by rows, give
exactly the clear program's output; the grouping respects reads from outside and the halo limit."""

from __future__ import annotations

import numpy as np
import pytest

from gravel.compiler import quantize
from gravel.compiler.passes import canonicalise
from gravel.compiler.plan import fold_output, make_plan, merge_tiles, partition, plan_stages
from gravel.compiler.program import stage_outputs
from gravel.compiler.tiles import group_tiles, input_window, run_tile, tile_lookups, tile_rows, windows
from gravel.compiler.qgraph import NumpyBackend
from tests.compiler.graphs import mlp, residual_cnn, tiled_cnn


@pytest.fixture(scope="module")
def tiled():
    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 12, 12))
    q = quantize(canonicalise(tiled_cnn(rng)), x)
    return q, q.quantize_input(x)


def test_tile_rows_cover_the_height_evenly():
    assert tile_rows(12, 2) == [(0, 6), (6, 12)]
    assert tile_rows(7, 3) == [(0, 2), (2, 5), (5, 7)]
    spans = tile_rows(28, 16)
    assert spans[0][0] == 0 and spans[-1][1] == 28 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


@pytest.mark.parametrize("tiles", [2, 3, 5])
def test_every_operator_on_row_windows_equals_the_whole_tensor(tiled, tiles):
    """Each tiled stage's tiles, joined on the row axis, are exactly its unsplit output, for
    every operator of tiled_cnn, with the merged stages' shards read by the next stage."""
    q, xq = tiled
    stages = fold_output(merge_tiles(partition(q), tiles, max_overhead=10.0), tiles)  # uneven tiles too
    plan = make_plan(stages, tiles)
    assert any(st.tiles for st in stages)
    outputs = stage_outputs(q, stages, plan, xq)
    whole = q.forward_int(xq, keep=True)
    for st, row in zip(stages, plan.stages):
        joined = np.concatenate(outputs[st.name], axis=1 + row.axis) if row.shards > 1 else outputs[st.name][0]
        if st.tail:
            continue
        assert np.array_equal(joined, whole[st.output.name]), st.name
    # and the program's output as a whole
    assert np.array_equal(np.sum(outputs[stages[-1].name], axis=0) if plan.stages[-1].partial
                          else outputs[stages[-1].name][0], q.forward_int(xq))


def test_run_tile_is_exact_on_arbitrary_windows(tiled):
    """Any row range of any merged run, not only the planned tiles."""
    q, xq = tiled
    nodes = [n for n in q.nodes[1:] if n.name not in ("ap", "fl", "fc")]
    whole = q.forward_int(xq, keep=True)
    backend = NumpyBackend()
    for out in ("r3", "r4", "cat", "r6"):
        h = q.node(out).shape[1]
        for rows in [(0, 1), (h - 1, h), (1, h - 1), (0, h)]:
            got = run_tile(nodes, out, {"input": xq}, rows, backend)
            assert np.array_equal(got, whole[out][:, :, rows[0]:rows[1]]), (out, rows)


def test_windows_grow_by_each_convolutions_reach(tiled):
    q, _ = tiled
    c1, c2, dw = q.node("c1"), q.node("c2"), q.node("dw")
    assert input_window(c1, (0, 6)) == (0, 7)  # 3x3, pad 1: one row below
    assert input_window(c2, (6, 12)) == (4, 12)  # dilation 2: two rows above, padding below
    assert input_window(dw, (0, 3)) == (0, 7)  # stride 2, no top padding: rows 0..6
    assert input_window(dw, (3, 6)) == (6, 12)  # bottom padding of 1 row: row 12 is padding
    need = windows([n for n in q.nodes if n.name in ("c1", "r1", "c2", "r2", "r1_requant", "add", "r3")], "r3", (0, 6))
    assert need["r3"] == (0, 6) and need["r1"] == (0, 8) and need["input"] == (0, 9)


def test_grouping_keeps_outside_readers_and_the_halo_limit():
    rng = np.random.default_rng(3)
    x = rng.random((30, 1, 8, 8))
    # residual_cnn: conv-relu, conv-relu with the skip, maxpool, Gemm: the three convolutional
    # stages merge (the skip is read inside the run); the output stage never does
    q = quantize(canonicalise(residual_cnn(rng)), x)
    stages = partition(q)
    runs = group_tiles(stages, 2)
    assert runs and all(len(r) >= 2 for r in runs) and len(stages) - 1 not in [k for r in runs for k in r]
    for r in runs:  # nothing after a run reads any stage but its last
        inner = {stages[k].name for k in r[:-1]}
        assert not any(i in inner for st in stages[r[-1] + 1:] for i in st.inputs)
    # the longest run within the halo limit: with 2 tiles all three (9 % more lookups); with 4,
    # the first conv's halo would cost 27 %, so only conv+join and the max pooling (whose own
    # input is read whole from the stage before, no halo) merge
    assert runs == [[0, 1, 2]]
    assert group_tiles(stages, 4) == [[1, 2]]
    assert group_tiles(stages, 2, max_overhead=0.05) == [[1, 2]]
    assert group_tiles(stages, 1) == []
    merged = merge_tiles(stages, 2)
    tiled_stages = [st for st in merged if st.tiles]
    assert tiled_stages and [st.name for st in merged] == [f"stage{k}" for k in range(len(merged))]
    readers = [st for st in merged if any(i == tiled_stages[0].name for i in st.inputs)]
    assert readers and all(st.in_axis(st.inputs.index(tiled_stages[0].name)) == 1 for st in readers)


def test_the_halo_is_counted_in_the_plan(tiled):
    q, _ = tiled
    stages, plan = plan_stages(q, 2, tiles=True)
    for st, row in zip(stages, plan.stages):
        if st.tiles:
            spans = tile_rows(st.output.shape[1], 2)
            assert row.axis == 1 and row.functions and row.shards == 2
            assert row.pbs_per_shard == max(tile_lookups(st.nodes, st.output.name, s) for s in spans)
            assert row.pbs_per_shard * 2 > st.lookups  # halo rows are computed by both tiles
    # one process, or no --tiles: nothing is merged
    assert not any(st.tiles for st in plan_stages(q, 1, tiles=True)[0])
    assert not any(st.tiles for st in plan_stages(q, 2)[0])


def test_a_model_without_convolutional_runs_is_planned_as_before():
    rng = np.random.default_rng(4)
    q = quantize(canonicalise(mlp(rng, dict(fn="relu"))), rng.random((30, 64)))
    assert plan_stages(q, 2, tiles=True)[1] == plan_stages(q, 2)[1]


def test_the_simulated_program_runs_tile_functions_to_the_clear_prediction():
    """Lowered to concrete (simulation, exact rounding): one function per tile, each reading the
    whole input and returning its rows; the next stage joins them on the row axis."""
    from gravel.compiler import QuantConfig, build, lower
    from gravel.harness.check import simulate

    rng = np.random.default_rng(6)
    x = rng.random((40, 1, 8, 8))
    compiled = build(residual_cnn(rng), x, QuantConfig(rounding="exact", search=False), max_shards=2, tiles=True)
    row = compiled.plan.stages[0]
    assert row.axis == 1 and row.functions == ("stage0_0", "stage0_1") and compiled.stages[0].merged == 3
    assert any("row tiles with a halo" in note for note in compiled.qgraph.notes)
    module = lower(compiled, x, p_error=1e-6, simulation=True, fused=False)
    assert compiled.plan.stages[0].functions == ("stage0_0", "stage0_1"), compiled.qgraph.notes  # no fallback
    assert np.array_equal(simulate(module, compiled, x[:8]), compiled.qgraph.predict(x[:8]))


def test_uneven_tiles_count_against_the_halo_limit():
    """Latency follows the slowest tile: 8 rows in 3 tiles (3, 2, 3) cost at least 3 * 3 / 8 - 1
    over an even share, before any halo."""
    from gravel.compiler.tiles import _overhead

    rng = np.random.default_rng(3)
    q = quantize(canonicalise(residual_cnn(rng)), rng.random((30, 1, 8, 8)))
    stages = partition(q)
    assert _overhead(stages, [1, 2], 2) == 0.0  # even tiles, the pooling's own input read whole
    assert _overhead(stages, [1, 2], 3) >= 3 * 3 / 8 - 1
