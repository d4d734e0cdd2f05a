"""The compiler's passes end to end: import, canonicalise, quantize, partition, plan shards,
lower to concrete, write the artifact. Each step is named; a failure names the step, the steps
that ran before it and (through the error itself) the node.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gravel.compiler.artifact import write_artifact
from gravel.compiler.ir import Graph
from gravel.compiler.passes import Pass, canonicalise, run_passes
from gravel.compiler.plan import DEFAULT_MAX_SHARDS, ShardPlan, Stage, plan_stages
from gravel.compiler.program import DEFAULT_P_ERROR, compile_program, input_compatible
from gravel.compiler.qgraph import QGraph
from gravel.compiler.quantize import MAX_INTEGER_BITS, QuantConfig, conform_batch, quantize
from gravel.compiler.tiles import tile_notes
from gravel.errors import ModelError
from gravel.protocol import Manifest

__all__ = ["Compiled", "Finetune", "build", "compile_graph", "import_model"]


@dataclass
class Compiled:
    """Everything the passes produced, for the artifact writer, `check` and tests."""

    source: Graph  # as imported
    graph: Graph  # canonical float graph
    qgraph: QGraph
    stages: list[Stage]
    plan: ShardPlan
    info: dict[str, Any] = field(default_factory=dict)
    config: QuantConfig = field(default_factory=QuantConfig)  # the settings the quantizer used

    @property
    def notes(self) -> list[str]:
        return self.qgraph.notes


def import_model(model: Any, sample: np.ndarray | None = None) -> tuple[Graph, dict[str, Any]]:
    """A Graph and a description of a checkpoint path, an ONNX path, an nn.Module or a Graph.

    `sample` (one batch in the model's input layout) fixes the input shape where the model
    does not declare it (an nn.Module)."""
    if isinstance(model, Graph):
        return model, {"name": model.name, "source": "graph"}
    from torch import nn

    from gravel.compiler.importers import load_graph_model

    # a checkpoint records its input shape and an ONNX file declares it: only a module needs one
    return load_graph_model(model, sample if isinstance(model, nn.Module) else None)


@dataclass(frozen=True)
class Finetune:
    """Fine-tune the quantized program (`gravel.compiler.finetune`) `epochs` epochs on the
    labelled samples `x`, `y` (training samples, not the calibration ones; the commands take
    10,000 unless told otherwise)."""

    x: np.ndarray
    y: np.ndarray
    epochs: int = 3
    progress: bool = False

    @classmethod
    def of(cls, data: Any, epochs: int, samples: int | None = None, progress: bool = False) -> Finetune:
        """The first `samples` (default FINETUNE_SAMPLES) of a data set's training samples."""
        from gravel.compiler.finetune import FINETUNE_SAMPLES

        n = samples or FINETUNE_SAMPLES
        return cls(data.x_train[:n], data.y_train[:n], epochs, progress)


def build(model: Any, calib_x: np.ndarray, config: QuantConfig = QuantConfig(),
          max_shards: int = DEFAULT_MAX_SHARDS, calib_y: np.ndarray | None = None,
          finetune: Finetune | None = None, tiles: bool = False) -> Compiled:
    """Import, canonicalise, quantize (calibrating on `calib_x`, labelled by `calib_y` where
    known, which sharpens the post-training search), fine-tune where asked, partition and plan
    (`tiles`: runs of convolutional stages as row tiles with a halo, compiler/tiles.py)."""
    source, info = import_model(model, calib_x[:1])
    graph = canonicalise(source)
    calib = conform_batch(calib_x, graph.input_shape)
    state: dict[str, Any] = {}

    def _quantize(g: Graph) -> Graph:
        if config.search:
            state["q"], state["config"] = search_quantize(g, calib, config, calib_y)
        else:
            state["q"], state["config"] = quantize(g, calib, config), config
        return g

    def _finetune(g: Graph) -> Graph:
        from gravel.compiler.finetune import finetune_qgraph

        q = state["q"]
        result = finetune_qgraph(q, finetune.x, finetune.y, calib, epochs=finetune.epochs,
                                 max_integer_bits=MAX_INTEGER_BITS, progress=finetune.progress)
        q.notes.append(result.note())
        info["finetune"] = {"samples": result.samples, "epochs": result.epochs, "best_epoch": result.best_epoch,
                            "accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after}
        return g

    def _partition(g: Graph) -> Graph:
        state["stages"], state["plan"] = plan_stages(state["q"], max_shards, tiles=tiles)
        if tiles:
            state["q"].notes.extend(tile_notes(state["stages"], max_shards))
        return g

    passes = [Pass("quantize", _quantize)]
    if finetune is not None:
        passes.append(Pass("fine-tune the quantized program", _finetune))
    passes.append(Pass("partition and plan shards", _partition))
    run_passes(graph, passes, check=lambda g: None)
    return Compiled(source, graph, state["q"], state["stages"], state["plan"], info, state["config"])


def search_quantize(graph: Graph, calib: np.ndarray, config: QuantConfig,
                    labels: np.ndarray | None = None) -> tuple[QGraph, QuantConfig]:
    """The cheapest rung of `config.ladder()` that keeps the float model's accuracy on the
    labelled calibration samples within `config.max_loss` (without labels: whose argmax
    differs from the float model's on at most `config.max_disagreement`) and the float model's
    predictions on interpolated calibration samples (`mixups`) on all but
    `config.max_mix_disagreement` of them, else the rung that did best; the choice is noted.

    With labels, a rung must also keep the share of predictions that differ from the float
    model's within `config.max_disagreement`: on 300 calibration samples accuracy alone lets
    rungs through whose errors happen to cancel there and not on held-out data. The blends
    matter most: a model is confident on its own training samples, where few rungs flip any.

    A rung above the first is then narrowed lookup by lookup: each lookup goes back to the
    activation and lookup widths of the cheapest earlier rung that still passes and flips at
    most half a percent more of the blends than the rung did, so only the layers that need the
    wider lookups pay for them."""
    import math
    from dataclasses import replace

    from gravel.compiler.ir import evaluate
    from gravel.compiler.qgraph import signed_width
    from gravel.compiler.quantize import _Quantizer, mixups

    def argmax(x: np.ndarray) -> np.ndarray:
        return np.asarray(evaluate(graph, x)).reshape(len(x), -1).argmax(1)

    blends = mixups(calib)
    reference, reference_mix = argmax(calib), argmax(blends)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(calib),):
            raise ModelError(f"{labels.shape} calibration labels for {len(calib)} calibration samples")
        float_acc = float((reference == labels).mean())
    limit = config.max_loss if labels is not None else config.max_disagreement

    @dataclass
    class Trial:
        gap: float  # accuracy loss (with labels) or calibration flips
        flips: float  # calibration predictions that differ from the float model's
        mix: float  # the same on the blends
        q: QGraph
        rung: QuantConfig
        keys: list[str] = field(default_factory=list)
        index: int = 0

        @property
        def passes(self) -> bool:
            return (self.gap <= limit and self.flips <= config.max_disagreement
                    and self.mix <= config.max_mix_disagreement)

    def judge(cfg: QuantConfig, index: int = 0) -> Trial:
        quantizer = _Quantizer(graph, calib, cfg)
        q = quantizer.run()
        if max(signed_width(n.lo, n.hi) for n in q.nodes) > MAX_INTEGER_BITS:
            return Trial(math.inf, math.inf, math.inf, q, cfg, quantizer.lut_keys, index)  # no parameters
        pred = q.predict(calib)
        flips = float((pred != reference).mean())
        gap = float_acc - float((pred == labels).mean()) if labels is not None else flips
        mix = float((q.predict(blends) != reference_mix).mean())
        return Trial(gap, flips, mix, q, cfg, quantizer.lut_keys, index)

    rungs = config.ladder()
    tried: list[Trial] = []
    best = None
    for k, rung in enumerate(rungs):
        tried.append(judge(rung, k))
        if tried[-1].passes:
            best = tried[-1]
            break
    if best is None:
        # none passes: of the rungs within half a point of the least loss, the cheapest within
        # one point of their fewest flipped blends (a wider rung costs every lookup its width,
        # in time and keys, for a gain within the noise of a few hundred calibration samples)
        least_gap = min(t.gap for t in tried)
        near = [t for t in tried if t.gap <= least_gap + 0.005]
        least_mix = min(t.mix for t in near)
        best = next(t for t in near if t.mix <= least_mix + 0.01)
    chosen = best
    narrowed: list[str] = []
    if best.passes and best.index > 0:
        for key in dict.fromkeys(best.keys):
            for cheaper in rungs[: best.index]:
                if (cheaper.a_bits, cheaper.tlu_bits) == (chosen.rung.a_bits, chosen.rung.tlu_bits):
                    continue
                rung = chosen.rung
                trial = judge(replace(rung, node_bits=rung.node_bits + ((key, cheaper.a_bits),),
                                      node_tlu_bits=rung.node_tlu_bits + ((key, cheaper.tlu_bits),)))
                if trial.passes and trial.flips <= best.flips + 0.005 and trial.mix <= best.mix + 0.005:
                    chosen = trial
                    narrowed.append(key)
                    break
    what = ("accuracy loss against the float model" if labels is not None
            else "share of predictions that differ from the float model's")
    wide = [key for key in dict.fromkeys(best.keys) if key not in narrowed]
    where = ""
    if narrowed:
        where = (f" (lookups {', '.join(wide) or 'none'} at these widths, "
                 f"the other {len(narrowed)} narrower)")
    rung, q = chosen.rung, chosen.q
    q.notes.append(
        f"post-training quantization chose {rung.in_bits}-bit inputs, {rung.w_bits}-bit weights, "
        f"{rung.a_bits}-bit activations and {rung.tlu_bits}-bit lookups{where}, the cheapest tried: {what} "
        f"{100 * chosen.gap:.1f} % on {len(calib)} calibration samples (wanted <= {100 * limit:.1f} %), "
        f"predictions differing from the float model's on {100 * chosen.mix:.1f} % of blends of them "
        f"(wanted <= {100 * config.max_mix_disagreement:.1f} %)"
    )
    return q, rung


def lower(compiled: Compiled, calib_x: np.ndarray, p_error: float = DEFAULT_P_ERROR, simulation: bool = False,
          show_progress: bool = False, compress_keys: bool = True, fused: bool | None = None) -> Any:
    """The concrete module of a built model, with the whole-network function (`fused`, on by
    default) beside the stage functions: one process runs that in one backend call, Ray workers
    run the stages' shards; both share the one key set."""
    if fused is None:
        fused = True
    calib_q = compiled.qgraph.quantize_input(conform_batch(calib_x, compiled.graph.input_shape))

    def compile_() -> Any:
        if show_progress:  # concrete reports nothing while it compiles; say what the wait is
            functions = sum(max(1, len(row.functions)) for row in compiled.plan.stages) + bool(fused)
            print(f"lowering to concrete: {functions} functions, {len(compiled.plan.stages)} stages "
                  f"(choosing TFHE parameters, generating code; minutes for large models)", file=sys.stderr)
        return compile_program(compiled.qgraph, compiled.stages, compiled.plan, calib_q, p_error=p_error,
                               simulation=simulation, compress_keys=compress_keys, fused=fused)

    per_shard = [row.name for row in compiled.plan.stages if row.functions]
    try:
        if not per_shard:
            return compile_()
        try:
            module = compile_()
            if not input_compatible(module, compiled.plan):
                raise ModelError("the first stage's shard functions read the client's input in different encodings")
            return module
        except (ModelError, ValueError) as exc:
            # Where concrete cannot give a split stage's shard functions one encoding (or
            # compile them), every stage runs whole: the plan without shard functions.
            compiled.stages, compiled.plan = plan_stages(compiled.qgraph, 1)
            compiled.qgraph.notes.append(
                f"stages {', '.join(per_shard)} run as one shard each: "
                f"splitting them failed ({str(exc).splitlines()[0][:200]})")
            return compile_()
    except ModelError as exc:
        raise ModelError(f"pass 'lower to concrete' failed: {exc}") from exc


def compile_graph(
    model: Any,
    calib_x: np.ndarray,
    out: str | Path,
    config: QuantConfig = QuantConfig(),
    p_error: float = DEFAULT_P_ERROR,
    max_shards: int = DEFAULT_MAX_SHARDS,
    name: str | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    compress_keys: bool = True,
    fused: bool | None = None,
    calib_y: np.ndarray | None = None,
    finetune: Finetune | None = None,
    tiles: bool = False,
) -> Manifest:
    """All passes, then the artifact directory (written atomically: nothing half-written).
    `tiles`: split runs of convolutional stages in row tiles with a halo (one call per shard
    for the run, no gathers inside it) rather than each stage by output channels."""
    compiled = build(model, calib_x, config, max_shards, calib_y, finetune, tiles)
    if name:
        compiled.info["name"] = name
    module = lower(compiled, calib_x, p_error, show_progress=show_progress, compress_keys=compress_keys, fused=fused)
    info = dict(compiled.info, notes=compiled.notes)
    return write_artifact(out, compiled.qgraph, compiled.stages, compiled.plan, module, info, p_error,
                          overwrite=overwrite)
