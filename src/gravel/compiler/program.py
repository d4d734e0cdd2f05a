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

__all__ = ["DEFAULT_P_ERROR", "TraceBackend", "compile_program", "inputsets"]

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


def compile_program(
    graph: IntGraph,
    plan: ShardPlan,
    calib_x: np.ndarray,
    p_error: float = DEFAULT_P_ERROR,
    simulation: bool = False,
    show_progress: bool = False,
    compress_keys: bool = True,
):
    """Compile to a concrete `fhe` module (real or simulated); bounds come from `calib_x`."""
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
        return module.compile(inputsets(graph, plan, calib_x), config)
    except RuntimeError as exc:
        raise ModelError(f"concrete could not compile the program: {exc}") from exc
