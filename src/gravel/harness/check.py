"""`gravel check`: can this model run encrypted, what will it cost, and where does accuracy go?

Pre-flight, before the long compile: every unsupported node at once (the importer collects
them all); for a supported model, table lookups and their widths per stage, the estimated
evaluation-key size (from a simulated compile) and latency on this machine (from a measured
per-lookup cost), float and quantized accuracy. Where quantization costs more than the
tolerance, the layer that loses it and the bit width that would keep it. Then, optionally,
the simulated program and a few real encrypted inferences.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gravel.compiler import QuantConfig, build, evaluate, lower
from gravel.compiler.pipeline import Compiled
from gravel.compiler.plan import INPUT, make_plan
from gravel.compiler.program import FUSED
from gravel.compiler.quantize import conform_batch
from gravel.data import Dataset
from gravel.errors import ModelError
from gravel.harness.common import calib_images, calib_labels

__all__ = ["TOLERANCE", "check", "format_check", "simulate", "simulation_model", "stage_widths"]

# accuracy a quantized model may lose against its float model before check names a culprit
TOLERANCE = 0.015


def simulation_model(compiled: Compiled, calib_x: np.ndarray, p_error: float) -> Any:
    """A simulated program for accuracy checks: one shard per stage and the fused function,
    so each sample is one `simulate` call (each call has a large fixed cost); sharding does
    not change what a stage computes."""
    one = replace(compiled, plan=make_plan(compiled.stages, 1))
    return one, lower(one, calib_x, p_error=p_error, simulation=True, fused=True)


def simulate(module: Any, compiled: Compiled, x: np.ndarray) -> np.ndarray:
    """Predictions of a simulated (fhe_simulation=True) program: the fused function where the
    module has one, else stage by stage and shard by shard."""
    from gravel.protocol.manifest import stage_arguments

    graph, stages, plan = compiled.qgraph, compiled.stages, compiled.plan
    fused = getattr(module, FUSED, None)
    preds = []
    for q in graph.quantize_input(conform_batch(x, graph.input_shape)):
        outputs: dict[str, list] = {INPUT: [q]}
        try:
            if fused is not None:
                outputs[stages[-1].name] = [fused.simulate(q)]
            else:
                for st, row in zip(stages, plan.stages):
                    parts = stage_arguments(row.to_json(), outputs)
                    outputs[st.name] = [
                        getattr(module, row.function(j)).simulate(*parts) for j in range(row.shards)]
        except ValueError:
            # a simulated lookup error left a value outside the next stage's input range,
            # which concrete refuses: count the sample as mispredicted (-1)
            preds.append(-1)
            continue
        # a last stage split into partial outputs: the client adds them
        out = np.sum([np.asarray(p, dtype=np.int64) for p in outputs[stages[-1].name]], axis=0)[None]
        preds.append(int(np.argmax(graph.dequantize_output(out))))
    return np.asarray(preds, dtype=np.int64)


def stage_widths(compiled: Compiled) -> list[dict[str, Any]]:
    """Per stage: the layers it holds, its lookups and their input widths, its shards."""
    rows = []
    for st, row in zip(compiled.stages, compiled.plan.stages):
        widths: dict[int, int] = {}
        for n in st.nodes:
            if n.op == "lut":
                bits = n.attrs["acc_bits"] - n.attrs["lsbs"]
                widths[bits] = widths.get(bits, 0) + n.lookups
            elif n.op == "maxpool":
                from gravel.compiler.qgraph import signed_width

                bits = signed_width(n.lo - n.hi, n.hi - n.lo)
                widths[bits] = widths.get(bits, 0) + n.lookups
        rows.append({
            "stage": st.name,
            "layers": ", ".join(dict.fromkeys(n.source for n in st.nodes)) or "(relay)",
            "ops": "+".join(n.op for n in st.nodes) or "relay",
            "table_lookups": st.lookups,
            "lookup_bits": {str(k): v for k, v in sorted(widths.items())},
            "shards": row.shards,
        })
    return rows


def _culprit(model: Any, compiled: Compiled, calib_x: np.ndarray, x: np.ndarray, y: np.ndarray,
             acc_float: float, config: QuantConfig) -> list[str]:
    """The layer whose bits, raised alone, recover most accuracy, and the fewest bits that keep
    the model within TOLERANCE of float. A layer's bits are its weights (Gemm/Conv), its
    activation's output levels, or the width of the lookup computing it (the accumulator is
    rounded to that width first, often what loses most in convolutions)."""
    from dataclasses import replace

    from gravel.compiler.quantize import _Quantizer, quantize

    g = compiled.graph
    calib = conform_batch(calib_x, g.input_shape)
    candidates: list[tuple[str, str]] = [("bits", n.name) for n in g.nodes if n.op in ("act", "gemm", "conv")]
    candidates.append(("bits", "input"))
    lookups = _Quantizer(g, calib, config)
    lookups.run()
    candidates += [("lookup", key) for key in dict.fromkeys(lookups.lut_keys)]

    def accuracy(kind: str, name: str, bits: int) -> float:
        if kind == "lookup":
            cfg = replace(config, node_tlu_bits=config.node_tlu_bits + ((name, bits),))
        elif name == "input":
            cfg = replace(config, in_bits=bits)
        else:
            cfg = replace(config, node_bits=config.node_bits + ((name, bits),))
        q = quantize(g, calib, cfg)
        return float((q.predict(x) == y).mean())

    top = {"bits": 8, "lookup": 12}
    gains = {c: accuracy(*c, top[c[0]]) for c in candidates}
    best = max(gains, key=gains.get)
    base = float((compiled.qgraph.predict(x) == y).mean())
    if gains[best] <= base:
        return ["no single layer recovers the loss: raise the defaults (--a-bits, --w-bits, --in-bits, --tlu-bits)"]
    kind, name = best
    node = g.node(name) if name in {n.name for n in g.nodes} else None
    what = "input" if name == "input" else f"layer '{(node.source or node.name) if node else name}'" + (
        f" ({node.op})" if node else "")
    if kind == "lookup":
        unit, first = "-bit lookups", config.tlu_for(name) + 1
    elif node is None:
        unit, first = " input bits (--in-bits)", 2
    else:
        unit, first = " weight bits" if node.op in ("gemm", "conv") else " activation bits", 2
    for bits in range(first, top[kind] + 1):
        if acc_float - accuracy(kind, name, bits) <= TOLERANCE:
            return [(f"{what} loses the most accuracy: {bits}{unit} keep the model within "
                     f"{100 * TOLERANCE:.1f} points of float ({100 * gains[best]:.1f} % at {top[kind]})")]
    return [(f"{what} loses the most accuracy, but even {top[kind]}{unit} there leave "
             f"{100 * (acc_float - gains[best]):.1f} points: raise the defaults too")]


def check(
    model: str | Path | Any,
    data: Dataset,
    samples: int = 500,
    sim_samples: int = 100,
    fhe_samples: int = 3,
    config: QuantConfig = QuantConfig(),
    calib: int = 500,
    progress: bool = True,
    estimate: bool = True,
    advice: bool = False,
    batch: int = 1,
    finetune: int = 0,
    finetune_samples: int | None = None,
    **compile_kwargs: Any,
) -> dict[str, Any]:
    """The report as a dict; `supported: False` with every problem when the model cannot run.
    `advice`: also compile for CKKS and say which backend suits batches of `batch` samples.
    `finetune`: epochs of fine-tuning the quantized program on (the first `finetune_samples`
    of) the training set, as `gravel compile --finetune` does (the figures are then the
    fine-tuned program's)."""
    from gravel.compiler import Finetune

    calib_x = calib_images(data, calib)
    tune = None
    if finetune:
        tune = compile_kwargs["finetune"] = Finetune.of(data, finetune, finetune_samples, progress)
    try:
        compiled = build(model, calib_x, config, compile_kwargs.get("max_shards") or 1, calib_labels(data, calib),
                         tune, compile_kwargs.get("tiles", False))
    except ModelError as exc:
        return {"supported": False, "problems": str(exc).splitlines()}
    x, y = data.x_test[:samples], data.y_test[:samples]
    xg = conform_batch(x, compiled.graph.input_shape)
    acc_float = float((np.asarray(evaluate(compiled.graph, xg)).reshape(len(x), -1).argmax(1) == y).mean())
    clear = compiled.qgraph.predict(x)
    acc_quant = float((clear == y).mean())
    p_error = compile_kwargs.get("p_error", 0.01)
    sim_compiled, module = simulation_model(compiled, calib_x, p_error)
    sim = simulate(module, sim_compiled, x[:sim_samples]) if sim_samples else np.zeros(0, np.int64)
    stages = stage_widths(compiled)
    widths: dict[int, int] = {}
    for row in stages:
        for bits, count in row["lookup_bits"].items():
            widths[int(bits)] = widths.get(int(bits), 0) + count
    warnings = list(compiled.notes)
    if acc_float - acc_quant > TOLERANCE:
        warnings.append(f"quantization costs {100 * (acc_float - acc_quant):.1f} points of accuracy")
        warnings += _culprit(model, compiled, calib_x, x, y, acc_float, replace(compiled.config, search=False))
        if not finetune:
            warnings.append("fine-tuning the quantized program often recovers this at the same widths, "
                            "without wider lookups: add --finetune 3 (to gravel check as well, to measure it)")
    result: dict[str, Any] = {
        "supported": True,
        "model": compiled.info.get("name"),
        "input_shape": list(compiled.graph.input_shape),
        "samples": int(len(x)),
        "accuracy_float": acc_float,
        "accuracy_quantized": acc_quant,
        "accuracy_simulated": float((sim == y[: len(sim)]).mean()) if len(sim) else None,
        "simulation_agreement": float((sim == clear[: len(sim)]).mean()) if len(sim) else None,
        "simulated_samples": int(len(sim)),
        "table_lookups": compiled.qgraph.lookups,
        "lookup_bits": {str(k): v for k, v in sorted(widths.items())},
        "eval_key_bytes_estimate": int(module.size_of_bootstrap_keys + module.size_of_keyswitch_keys),
        "stages": stages,
        "warnings": warnings,
    }
    if estimate:
        from gravel.harness.estimate import estimate_latency

        result["latency_estimate_s"] = estimate_latency(widths, p_error)
    if fhe_samples:
        from gravel.harness.bench import bench

        real = bench(model, data, samples=fhe_samples, config=config, progress=progress, **compile_kwargs)
        result["accuracy_encrypted"] = real["accuracy_encrypted"]
        result["encrypted_agreement"] = real["agreement"]
        result["encrypted_samples"] = real["samples"]
        result["eval_key_bytes"] = real["eval_key_bytes"]
        result["latency_s"] = real["latency_s"]
    if advice:
        from gravel.harness.advice import backend_advice

        result["backends"] = backend_advice(model, data, result, batch=batch, calib=calib, samples=samples)
    return result


def format_check(result: dict[str, Any]) -> str:
    """The report `gravel check` prints for a supported model's `check` result (its warnings
    go to stderr apart)."""
    r = result
    lines = [f"model input {tuple(r['input_shape'])}; accuracy on {r['samples']} test samples: "
             f"float {r['accuracy_float']:.4f}, quantized {r['accuracy_quantized']:.4f}",
             f"{'stage':8} {'ops':24} {'lookups':>8} {'bits:count':>16} {'shards':>6}  layers"]
    for row in r["stages"]:
        bits = " ".join(f"{b}:{c}" for b, c in row["lookup_bits"].items()) or "-"
        lines.append(f"{row['stage']:8} {row['ops'][:24]:24} {row['table_lookups']:>8} {bits:>16} "
                     f"{row['shards']:>6}  {row['layers'][:60]}")
    estimate = f", about {r['latency_estimate_s']:.1f} s per inference here" if "latency_estimate_s" in r else ""
    lines.append(f"table lookups {r['table_lookups']}; evaluation keys about "
                 f"{r['eval_key_bytes_estimate'] / 1e6:.1f} MB (uncompressed){estimate}")
    if r["simulated_samples"]:
        lines.append(f"FHE simulation on {r['simulated_samples']} samples: accuracy {r['accuracy_simulated']:.4f}, "
                     f"agreement with the quantized model {r['simulation_agreement']:.3f}")
    if "accuracy_encrypted" in r:
        lines.append(f"real encryption on {r['encrypted_samples']} samples: accuracy {r['accuracy_encrypted']:.4f}, "
                     f"agreement {r['encrypted_agreement']:.3f}, {r['latency_s']:.2f} s each, "
                     f"evaluation keys {r['eval_key_bytes'] / 1e6:.1f} MB")
    if "backends" in r:
        from gravel.harness.advice import format_advice

        lines.append(format_advice(r["backends"]))
    return "\n".join(lines)
