"""Lower the integer program to a concrete-python module: one FHE function per stage.

Function `stageK` takes every shard output of the stages it reads as separate encrypted
arguments (`x0`..`x{m-1}`, concatenated per input inside). A sharded stage has one function
per shard (`stageK_J`) with its slice's constants compiled in (plan.py says why not clear
weight arguments); every function runs in any process that holds the server program and the
evaluation keys. `fhe.Wired` declares which outputs feed
which inputs, so all functions share one key set and shard outputs are valid inputs of the
stages that read them. The optional `fused` function runs the whole network in one call.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from gravel.compiler.plan import INPUT, ShardPlan, Stage, shard_weights
from gravel.compiler.qgraph import NumpyBackend, QGraph, QNode, TraceBackend, run_node
from gravel.compiler.tiles import run_tile, tile_rows
from gravel.errors import ModelError
from gravel.protocol.manifest import shard_slice, stage_arguments

__all__ = ["DEFAULT_P_ERROR", "FUSED", "compile_program", "fused_compatible", "input_compatible", "run_stage",
           "shard_outputs"]

# Name of the optional whole-network function (see compile_program's `fused`).
FUSED = "fused"

# Probability of error per table lookup. Approximate rounding already allows off-by-one
# results; 1e-2 keeps parameters small and measured agreement with the clear model high.
DEFAULT_P_ERROR = 0.01


def _split_parts(stage: Stage, parts: list[Any], shards_of: dict[str, int], backend: Any) -> dict[str, Any]:
    """The full value of each input tensor from its producer's shard outputs."""
    values: dict[str, Any] = {}
    k = 0
    for index, (producer, tensor) in enumerate(zip(stage.inputs, stage.reads)):
        n = shards_of[producer]
        values[tensor] = backend.concat(list(parts[k : k + n]), axis=stage.in_axis(index))
        k += n
    return values


def _channel_slice(node: QNode, cols: slice, channels: int) -> QNode:
    """`node` (a lookup) restricted to output channels `cols`: per-channel parameters sliced."""

    def cut(v: Any) -> Any:
        return np.asarray(v)[cols] if np.ndim(v) >= 1 and np.shape(v)[0] == channels else v

    attrs = {k: cut(v) for k, v in node.attrs.items()}
    if isinstance(attrs.get("params"), dict):
        attrs["params"] = {k: cut(v) for k, v in attrs["params"].items()}
    shape = (cols.stop - cols.start, *node.shape[1:])
    return replace(node, attrs=attrs, shape=shape)


def run_stage(stage: Stage, parts: list[Any], shards_of: dict[str, int], backend: Any,
              shard: tuple[int, int] | None = None) -> Any:
    """One stage on the shard outputs of the stages it reads; or, with `shard=(shards,
    index)`, one shard of it (weights and per-channel lookup parameters sliced here). Used by
    the clear reference and the FHE program alike."""
    if not stage.nodes:  # a relay passes the client's input on
        return parts[0] * 1 if backend.lead == 0 else parts[0]
    if shard is not None and stage.tiles:  # one row tile of merged convolutional stages
        rows = tile_rows(stage.output.shape[1], shard[0])[shard[1]]
        return run_tile(stage.nodes, stage.output.name, _split_parts(stage, parts, shards_of, backend), rows, backend)
    cols = w = b = None
    if shard is not None:
        w, b = shard_weights(stage, *shard)
        cols = shard_slice(stage.channels, *shard)
    values = _split_parts(stage, parts, shards_of, backend)
    path: set[str] = set()  # values holding only this shard's channels
    for node in stage.body if cols is not None else stage.nodes:
        args = [values[i] for i in node.inputs]
        if node.op == "linear" and cols is not None:
            values[node.name] = run_node(node, args, backend, w, b)
            path.add(node.name)
        elif cols is not None and path & set(node.inputs):
            # after the shard's Gemm/Conv: a lookup with its channels' parameters, or a join
            # with the same channels of the other operand
            args = [a if i in path else (a[cols] if backend.lead == 0 else a[:, cols])
                    for i, a in zip(node.inputs, args)]
            sliced = _channel_slice(node, cols, stage.channels) if node.op == "lut" else node
            values[node.name] = run_node(sliced, args, backend)
            path.add(node.name)
        else:
            values[node.name] = run_node(node, args, backend)
    if cols is not None and stage.tail:
        return _partial_output(stage, values[stage.body[-1].name], cols, shard[1], backend)
    return values[stage.output.name]


def _partial_output(stage: Stage, h: Any, cols: slice, index: int, backend: Any) -> Any:
    """One shard's part of a folded output tail: the rows of its affine map that this shard's
    channels meet, and the constant in shard 0 only; the client adds the parts."""
    a, c = stage.tail_map
    inner = math.prod(stage.body[-1].shape[1:])
    rows = np.ascontiguousarray(a[cols.start * inner : cols.stop * inner])
    flat = h.reshape(h.shape[: backend.lead] + (-1,))
    part = flat @ rows
    return part + c if index == 0 else part


def shard_outputs(stage: Stage, row: Any, parts: list[Any], shards_of: dict[str, int], backend: Any) -> list[Any]:
    """Every shard's output of one stage, in the clear or under simulation-free tracing."""
    if row.functions:
        return [run_stage(stage, parts, shards_of, backend, shard=(row.shards, j)) for j in range(row.shards)]
    return [run_stage(stage, parts, shards_of, backend)]


def _signature(fn: Callable[..., Any], name: str, names: list[str]) -> Callable[..., Any]:
    fn.__name__ = name
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    return fn


def _stage_function(stage: Stage, row: Any, shards_of: dict[str, int], shard: int | None = None) -> Callable[..., Any]:
    """The traced function of a stage (or of one shard of it, for per-shard functions)."""
    backend = TraceBackend()
    n = row.in_parts
    names = [f"x{i}" for i in range(n)]
    part = (row.shards, shard) if shard is not None else None

    def fn(**kw: Any) -> Any:
        parts = [kw[f"x{i}"] for i in range(n)]
        return run_stage(stage, parts, shards_of, backend, shard=part)

    return _signature(fn, row.function(shard or 0), names)


def _fused_function(stages: list[Stage]) -> Callable[..., Any]:
    backend = TraceBackend()
    ones = {s.name: 1 for s in stages} | {INPUT: 1}

    def fn(x: Any) -> Any:
        outputs: dict[str, Any] = {INPUT: x}
        for st in stages:
            outputs[st.name] = run_stage(st, [outputs[i] for i in st.inputs], ones, backend)
        return outputs[stages[-1].name]

    return _signature(fn, FUSED, ["x"])


def stage_outputs(graph: QGraph, stages: list[Stage], plan: ShardPlan, q: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Clear shard outputs of every stage on a batch of quantized inputs (for inputsets and
    tests): what the FHE program computes, shard by shard."""
    backend = NumpyBackend()
    shards_of = {INPUT: 1} | {row.name: row.shards for row in plan.stages}
    outputs: dict[str, list[np.ndarray]] = {INPUT: [q]}
    for st, row in zip(stages, plan.stages):
        parts = stage_arguments(row.to_json(), outputs)
        outputs[st.name] = shard_outputs(st, row, parts, shards_of, backend)
    return outputs


def inputsets(graph: QGraph, stages: list[Stage], plan: ShardPlan, calib_q: np.ndarray) -> dict[str, list[tuple]]:
    """Per function, argument samples covering every shard; concrete measures bounds on them."""
    outputs = stage_outputs(graph, stages, plan, calib_q)
    sets: dict[str, list[tuple]] = {}
    for st, row in zip(stages, plan.stages):
        parts = stage_arguments(row.to_json(), outputs)
        samples = [tuple(np.ascontiguousarray(p[n]) for p in parts) for n in range(len(calib_q))]
        for name in row.functions or (st.name,):  # per-shard functions read the same arguments
            sets[name] = samples
    return sets


def fused_compatible(module: Any, plan: ShardPlan) -> bool:
    """Whether a ciphertext encrypted for the first stage is a valid input of the fused
    function, and its output decrypts as the last stage's: same key, shape and encoding
    (where the last stage returns partial outputs, the client tells the fused output by its
    single part). Checked on the compiled client spec."""
    circuits = {c["name"]: c for c in json.loads(module.client.specs.serialize())["circuits"]}
    if FUSED not in circuits:
        return False
    first = next(r for r in plan.stages if INPUT in r.inputs)
    last = plan.stages[-1]
    fused = circuits[FUSED]
    same_input = fused["inputs"][0]["typeInfo"] == circuits[first.function(0)]["inputs"][0]["typeInfo"]
    if last.partial:  # the client decrypts the fused output as the fused function's own
        return same_input
    return same_input and fused["outputs"][0]["typeInfo"] == circuits[last.name]["outputs"][0]["typeInfo"]


def input_compatible(module: Any, plan: ShardPlan) -> bool:
    """Whether one client ciphertext is a valid input of every function that reads it (the
    first stage's per-shard functions): same key, shape and encoding."""
    circuits = {c["name"]: c for c in json.loads(module.client.specs.serialize())["circuits"]}
    first = next(r for r in plan.stages if INPUT in r.inputs)
    kinds = {json.dumps(circuits[first.function(j)]["inputs"][0]["typeInfo"], sort_keys=True)
             for j in range(len(first.functions) or 1)}
    return len(kinds) == 1


def compile_program(
    graph: QGraph,
    stages: list[Stage],
    plan: ShardPlan,
    calib_q: np.ndarray,
    p_error: float = DEFAULT_P_ERROR,
    simulation: bool = False,
    compress_keys: bool = True,
    fused: bool = False,
) -> Any:
    """Compile to a concrete `fhe` module (real or simulated); bounds come from `calib_q`
    (quantized calibration inputs).

    `fused` adds one more function that runs the whole network in a single backend call. Every
    `Server.run` converts all bootstrap keys to the Fourier domain first (~0.1-0.2 s), so one
    process evaluating a one-shard-per-stage plan saves that cost once per stage but one.

    concrete's `show_progress` stays off: it does not show the compilation's progress but
    compiles trace messages into the program, so every server run would print a progress bar
    to stdout (up to 51 messages per backend call, on every worker)."""
    from concrete import fhe

    shards_of = {INPUT: 1} | {row.name: row.shards for row in plan.stages}
    rows = {row.name: row for row in plan.stages}
    attrs: dict[str, Any] = {}
    for st, row in zip(stages, plan.stages):
        spec = {f"x{i}": "encrypted" for i in range(row.in_parts)}
        for j, name in enumerate(row.functions or (st.name,)):
            attrs[name] = fhe.function(spec)(_stage_function(st, row, shards_of, j if row.functions else None))
    wires = set()
    for st, row in zip(stages, plan.stages):
        for reader in row.functions or (st.name,):
            k = 0
            for producer in st.inputs:
                for j in range(shards_of[producer]):
                    if producer != INPUT:
                        source = attrs[rows[producer].function(j)]
                        wires.add(fhe.Wire(fhe.Output(source, 0), fhe.Input(attrs[reader], k)))
                    k += 1
    if fused:
        attrs[FUSED] = fhe.function({"x": "encrypted"})(_fused_function(stages))
    attrs["composition"] = fhe.Wired(wires)
    module = fhe.module()(type("GravelProgram", (), attrs))
    config = fhe.Configuration(
        compress_evaluation_keys=compress_keys,
        dump_artifacts_on_unexpected_failures=False,
        compress_input_ciphertexts=True,
        p_error=p_error,
        fhe_simulation=simulation,
        fhe_execution=not simulation,
        show_progress=False,
    )
    try:
        sets = inputsets(graph, stages, plan, calib_q)
        if fused:
            sets[FUSED] = [(np.ascontiguousarray(x),) for x in calib_q]
        return module.compile(sets, config)
    except RuntimeError as exc:
        raise ModelError(f"concrete could not compile the program: {exc}") from exc
