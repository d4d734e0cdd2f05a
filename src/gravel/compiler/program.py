"""The integer graph as a concrete-python module: one FHE function per stage.

Function `stageK` takes the previous stage's shard outputs as separate encrypted arguments
(`x0`..`x{m-1}`, concatenated inside) plus one shard's weights `w` and bias `b` as clear
arguments, so a single compiled function evaluates every shard of its stage, in any process
that holds the server program and the evaluation keys. `fhe.Wired` declares which outputs feed
which inputs, so all functions share one key set and shard outputs are valid next-stage inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from gravel.compiler.graph import IntGraph, NumpyBackend, Stage, stage_forward
from gravel.compiler.plan import ShardPlan, shard_weights
from gravel.errors import ModelError

__all__ = ["DEFAULT_P_ERROR", "FUSED", "TraceBackend", "compile_program", "fused_compatible", "inputsets"]

# Name of the optional whole-network function (see compile_program's `fused`).
FUSED = "fused"

# Probability of error per table lookup. Approximate rounding already allows off-by-one
# results; 1e-2 keeps parameters small and measured agreement with the clear model high.
DEFAULT_P_ERROR = 0.01


class TraceBackend:
    """Stage operations on one sample under concrete's tracer."""

    batched = False

    def concat(self, parts):
        return parts[0] if len(parts) == 1 else np.concatenate(tuple(parts), axis=0)

    def flatten(self, x):
        return x.reshape((int(np.prod(x.shape)),))

    def gather(self, flat, index):
        return flat[index]

    def pad_zero(self, flat):
        from concrete import fhe

        return np.concatenate((flat, fhe.zeros((1,))), axis=0)

    def round(self, a, lsbs, exact=False):
        # Accumulator bounds come from the inputset: fhe.hint(bit_width=...) on the
        # accumulator gave wrong results with concrete-python 2.11.
        from concrete import fhe

        if lsbs == 0:
            return a
        exactness = fhe.Exactness.EXACT if exact else fhe.Exactness.APPROXIMATE
        return fhe.round_bit_pattern(a, lsbs_to_remove=lsbs, exactness=exactness)

    def lut(self, fn, a):
        from concrete import fhe

        return fhe.univariate(fn)(a)

    def to_channels_first(self, a, shape):
        return np.transpose(a).reshape((a.shape[1],) + tuple(shape))

    def reshape(self, x, shape):
        return x.reshape(tuple(shape))


def _stage_function(stage: Stage, in_parts: int) -> Callable[..., Any]:
    names = [f"x{i}" for i in range(in_parts)] + ["w", "b"]
    backend = TraceBackend()

    def fn(**kw):
        return stage_forward(stage, [kw[f"x{i}"] for i in range(in_parts)], kw["w"], kw["b"], backend)

    fn.__name__ = stage.name
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    return fn


def _fused_function(graph: IntGraph) -> Callable[..., Any]:
    """All stages in one function: x, then each stage's full weights and bias (clear)."""
    n = len(graph.stages)
    names = ["x"] + [f"{k}{i}" for i in range(n) for k in ("w", "b")]
    backend = TraceBackend()

    def fn(**kw):
        h = kw["x"]
        for i, stage in enumerate(graph.stages):
            h = stage_forward(stage, [h], kw[f"w{i}"], kw[f"b{i}"], backend)
        return h

    fn.__name__ = FUSED
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    return fn


def fused_compatible(module: Any, graph: IntGraph) -> bool:
    """Whether a ciphertext encrypted for the first stage is a valid input of the fused
    function, and its output decrypts as the last stage's: same key, shape and encoding.
    Checked on the compiled client spec, so the client never needs to know which ran."""
    import json

    circuits = {c["name"]: c for c in json.loads(module.client.specs.serialize())["circuits"]}
    if FUSED not in circuits:
        return False
    first, last = circuits[graph.stages[0].name], circuits[graph.stages[-1].name]
    fused = circuits[FUSED]
    return (
        fused["inputs"][0]["typeInfo"] == first["inputs"][0]["typeInfo"]
        and fused["outputs"][0]["typeInfo"] == last["outputs"][0]["typeInfo"]
    )


def inputsets(graph: IntGraph, plan: ShardPlan, calib_x: np.ndarray) -> dict[str, list[tuple]]:
    """Per function, (parts..., w, b) samples covering every shard; concrete measures bounds on them."""
    h = graph.quantize_input(calib_x)
    sets: dict[str, list[tuple]] = {}
    for stage, sp in zip(graph.stages, plan.stages):
        size = h.shape[1] // sp.in_parts
        weights = [shard_weights(stage, sp.shards, j) for j in range(sp.shards)]
        samples = []
        for n in range(len(h)):
            parts = tuple(np.ascontiguousarray(h[n, k * size : (k + 1) * size]) for k in range(sp.in_parts))
            samples.append(parts + weights[n % sp.shards])
        sets[stage.name] = samples
        h = stage_forward(stage, [h], stage.weight_matrix(), stage.bias, NumpyBackend())
    return sets


def fused_inputset(graph: IntGraph, calib_x: np.ndarray) -> list[tuple]:
    weights = tuple(a for stage in graph.stages for a in (stage.weight_matrix(), stage.bias))
    return [(x,) + weights for x in graph.quantize_input(calib_x)]


def compile_program(
    graph: IntGraph,
    plan: ShardPlan,
    calib_x: np.ndarray,
    p_error: float = DEFAULT_P_ERROR,
    simulation: bool = False,
    show_progress: bool = False,
    compress_keys: bool = True,
    fused: bool = False,
):
    """Compile to a concrete `fhe` module (real or simulated); bounds come from `calib_x`.

    `fused` adds one more function that runs the whole network in a single backend call. Every
    `Server.run` converts all bootstrap keys to the Fourier domain first (~0.1-0.2 s), so one
    process evaluating a one-shard-per-stage plan saves that cost once per stage but one."""
    from concrete import fhe

    attrs: dict[str, Any] = {}
    functions = {}
    for stage, sp in zip(graph.stages, plan.stages):
        spec = {f"x{i}": "encrypted" for i in range(sp.in_parts)} | {"w": "clear", "b": "clear"}
        functions[stage.name] = fhe.function(spec)(_stage_function(stage, sp.in_parts))
        attrs[stage.name] = functions[stage.name]
    wires = []
    for prev, (stage, sp) in zip(graph.stages, list(zip(graph.stages, plan.stages))[1:]):
        for k in range(sp.in_parts):
            wires.append(fhe.Wire(fhe.Output(functions[prev.name], 0), fhe.Input(functions[stage.name], k)))
    if fused:
        attrs[FUSED] = fhe.function({"x": "encrypted"} | {
            f"{k}{i}": "clear" for i in range(len(graph.stages)) for k in ("w", "b")
        })(_fused_function(graph))
    attrs["composition"] = fhe.Wired(set(wires))
    module = fhe.module()(type("GravelProgram", (), attrs))
    config = fhe.Configuration(
        compress_evaluation_keys=compress_keys,
        dump_artifacts_on_unexpected_failures=False,
        compress_input_ciphertexts=True,
        p_error=p_error,
        fhe_simulation=simulation,
        fhe_execution=not simulation,
        show_progress=show_progress,
    )
    try:
        sets = inputsets(graph, plan, calib_x)
        if fused:
            sets[FUSED] = fused_inputset(graph, calib_x)
        return module.compile(sets, config)
    except RuntimeError as exc:
        raise ModelError(f"concrete could not compile the program: {exc}") from exc
