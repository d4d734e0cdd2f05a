"""`gravel check`: where does accuracy go between the float model and encrypted execution?

Reports accuracy of the float model, the quantized integer model, the FHE program in
simulation and, for a few images, real encrypted execution; per stage the accumulator and
table-lookup bit widths and lookup counts; and, quantizing one stage at a time, the stage
whose quantization costs more than one point of accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gravel.compiler import QuantConfig, compile_program, float_forward, load_model_ops, make_plan, quantize
from gravel.compiler.artifact import backend_pbs_count
from gravel.compiler.graph import IntGraph, NumpyBackend, stage_forward
from gravel.compiler.ops import InputQuantOp
from gravel.compiler.plan import ShardPlan, shard_weights
from gravel.compiler.quantize import signed_width
from gravel.data import Dataset
from gravel.harness.bench import bench
from gravel.harness.common import calib_images

__all__ = ["check", "format_check", "simulate"]

DROP_WARNING = 0.01


def simulate(module: Any, graph: IntGraph, plan: ShardPlan, x: np.ndarray) -> np.ndarray:
    """Predictions of a simulated (fhe_simulation=True) program, shard by shard."""
    preds = []
    for image in graph.quantize_input(x):
        parts = [image]
        try:
            for stage, sp in zip(graph.stages, plan.stages):
                fn = getattr(module, stage.name)
                parts = [fn.simulate(*parts, *shard_weights(stage, sp.shards, j)) for j in range(sp.shards)]
        except ValueError:
            # a simulated lookup error left a value outside the next stage's input range,
            # which concrete refuses: count the image as mispredicted (-1)
            preds.append(-1)
            continue
        preds.append(int(np.argmax(graph.dequantize_output(parts[0]))))
    return np.asarray(preds, dtype=np.int64)


def _one_stage_quantized(core, graph: IntGraph, k: int, x: np.ndarray) -> np.ndarray:
    meta = graph.meta["stages"][k]
    start, end = meta["ops"]
    scale, offset = meta["in_quant"]
    h = float_forward(core[:start], x, quantize_input=False)
    h_int = np.round((h - offset) / scale).astype(np.int64)
    stage = graph.stages[k]
    y = stage_forward(stage, [h_int], stage.weight_matrix(), stage.bias, NumpyBackend())
    if stage.act is None:
        real = graph.dequantize_output(y)
    else:
        out_scale, out_offset = meta["out_quant"]
        real = y * out_scale + out_offset
    return float_forward(core[end:], real, quantize_input=False).argmax(1)


def check(
    model: str | Path,
    data: Dataset,
    samples: int = 500,
    sim_samples: int = 100,
    fhe_samples: int = 3,
    config: QuantConfig = QuantConfig(),
    calib: int = 500,
    progress: bool = True,
    **compile_kwargs: Any,
) -> dict[str, Any]:
    ops, _ = load_model_ops(model)
    core = ops[1:] if ops and isinstance(ops[0], InputQuantOp) else ops
    calib_x = calib_images(data, calib)
    graph = quantize(ops, calib_x, config)
    plan = make_plan(graph, compile_kwargs.get("max_shards", 16))
    x, y = data.x_test[:samples], data.y_test[:samples]
    acc_float = float((float_forward(core, x, quantize_input=False).argmax(1) == y).mean())
    clear = graph.predict(x)
    acc_quant = float((clear == y).mean())
    module = compile_program(graph, plan, calib_x, p_error=compile_kwargs.get("p_error", 0.01), simulation=True)
    sim = simulate(module, graph, plan, x[:sim_samples]) if sim_samples else np.zeros(0, np.int64)
    layers, warnings = [], []
    for k, stage in enumerate(graph.stages):
        acc_k = float((_one_stage_quantized(core, graph, k, x) == y).mean())
        width = stage.acc_bits or signed_width(*stage.acc_range)
        layers.append(
            {
                "stage": stage.name,
                "layer": stage.source,
                "accumulator_bits": width,
                "tlu_bits": width - stage.lsbs if stage.act else 0,
                "activation": stage.act.kind if stage.act else "output",
                "table_lookups": stage.pbs_count,
                "accuracy_with_only_this_quantized": acc_k,
            }
        )
        if acc_float - acc_k > DROP_WARNING:
            warnings.append(
                f"quantizing layer '{stage.source}' ({stage.name}) alone costs "
                f"{100 * (acc_float - acc_k):.1f} points of accuracy"
            )
    if acc_float - acc_quant > DROP_WARNING and not warnings:
        warnings.append(f"the quantized model loses {100 * (acc_float - acc_quant):.1f} points in total")
    result: dict[str, Any] = {
        "samples": int(len(x)),
        "accuracy_float": acc_float,
        "accuracy_quantized": acc_quant,
        "accuracy_simulated": float((sim == y[: len(sim)]).mean()) if len(sim) else None,
        "simulation_agreement": float((sim == clear[: len(sim)]).mean()) if len(sim) else None,
        "simulated_samples": int(len(sim)),
        "pbs_count": backend_pbs_count(module, plan),
        "table_lookups": plan.pbs_count,
        "eval_key_bytes_estimate": int(module.size_of_bootstrap_keys + module.size_of_keyswitch_keys),
        "layers": layers,
        "warnings": warnings,
    }
    if fhe_samples:
        real = bench(model, data, samples=fhe_samples, config=config, progress=progress, **compile_kwargs)
        result["accuracy_encrypted"] = real["accuracy_encrypted"]
        result["encrypted_agreement"] = real["agreement"]
        result["encrypted_samples"] = real["samples"]
        result["eval_key_bytes"] = real["eval_key_bytes"]
        result["latency_s"] = real["latency_s"]
    return result


def format_check(result: dict[str, Any]) -> str:
    """The table `gravel check` prints for a `check` result (its warnings go to stderr apart)."""
    r = result
    lines = [(f"accuracy on {r['samples']} test images: float {r['accuracy_float']:.4f}, "
              f"quantized {r['accuracy_quantized']:.4f}")]
    if r["simulated_samples"]:
        lines.append(f"FHE simulation on {r['simulated_samples']} images: accuracy {r['accuracy_simulated']:.4f}, "
                     f"agreement {r['simulation_agreement']:.3f}")
    if "accuracy_encrypted" in r:
        lines.append(f"real encryption on {r['encrypted_samples']} images: accuracy {r['accuracy_encrypted']:.4f}, "
                     f"agreement {r['encrypted_agreement']:.3f}, {r['latency_s']:.2f} s each, "
                     f"evaluation keys {r['eval_key_bytes'] / 1e6:.1f} MB")
    lines.append(f"table lookups: {r['pbs_count']}; evaluation keys (uncompressed estimate): "
                 f"{r['eval_key_bytes_estimate'] / 1e6:.1f} MB")
    lines.append(f"{'stage':8} {'layer':14} {'act':8} {'acc bits':>8} {'tlu bits':>8} {'lookups':>8} "
                 f"{'acc if only this quantized':>27}")
    for row in r["layers"]:
        lines.append(f"{row['stage']:8} {row['layer']:14} {row['activation']:8} {row['accumulator_bits']:>8} "
                     f"{row['tlu_bits']:>8} {row['table_lookups']:>8} {row['accuracy_with_only_this_quantized']:>27.4f}")
    return "\n".join(lines)
