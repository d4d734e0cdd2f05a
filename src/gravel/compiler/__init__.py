"""Model owner's side: import, quantize and compile a model into an artifact directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gravel.compiler.artifact import load_graph, write_artifact
from gravel.compiler.graph import IntGraph
from gravel.compiler.ops import FloatOp, float_forward
from gravel.compiler.plan import DEFAULT_MAX_SHARDS, ShardPlan, make_plan
from gravel.compiler.program import DEFAULT_P_ERROR, compile_program
from gravel.compiler.quantize import QuantConfig, quantize
from gravel.errors import ModelError
from gravel.protocol import Manifest

__all__ = [
    "DEFAULT_P_ERROR",
    "IntGraph",
    "QuantConfig",
    "ShardPlan",
    "compile_model",
    "compile_program",
    "float_forward",
    "load_graph",
    "load_model_ops",
    "make_plan",
    "quantize",
]


def load_model_ops(model: Any) -> tuple[list[FloatOp], dict[str, Any]]:
    """Float operators and a description of a checkpoint path, an ONNX path or an nn.Module."""
    from torch import nn

    from gravel.compiler.chain_import import ops_from_onnx, ops_from_torch
    from gravel.model.checkpoint import load_checkpoint

    if isinstance(model, nn.Module):
        return ops_from_torch(model), {"name": type(model).__name__, "source": "torch"}
    path = Path(model)
    if not path.exists():
        raise ModelError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        return ops_from_onnx(path), {"name": path.stem, "source": "onnx"}
    ckpt = load_checkpoint(path)
    info = {"name": path.stem, "source": "checkpoint", "arch": ckpt.arch, "options": ckpt.options, "dataset": ckpt.dataset}
    return ops_from_torch(ckpt.model), info


def compile_model(
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
) -> Manifest:
    """Import, quantize (calibrating on `calib_x`), plan shards, compile and write the artifact.

    `fused` (default: when every stage has one shard, i.e. a single-process plan) also
    compiles the whole network as one function, which the server uses when it runs alone."""
    ops, info = load_model_ops(model)
    if name:
        info["name"] = name
    graph = quantize(ops, calib_x, config)
    plan = make_plan(graph, max_shards)
    if fused is None:
        fused = all(sp.shards == 1 for sp in plan.stages)
    module = compile_program(
        graph, plan, calib_x, p_error=p_error, show_progress=show_progress, compress_keys=compress_keys,
        fused=fused,
    )
    return write_artifact(out, graph, plan, module, info, p_error, overwrite=overwrite)
