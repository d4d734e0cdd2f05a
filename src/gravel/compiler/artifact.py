"""Write a compiled model as an artifact directory, and read its integer graph back.

The directory is built next to its destination and renamed into place, so an interrupted or
failed compile never leaves a half-written artifact, and an existing one is replaced only when
asked and only once the new one is complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from gravel.compiler.graph import Activation, IntGraph, Stage
from gravel.compiler.plan import ShardPlan
from gravel.compiler.program import FUSED, fused_compatible
from gravel.errors import ArtifactError
from gravel.protocol.manifest import FORMAT_VERSION, Manifest, concrete_version, file_sha256, load_manifest

__all__ = ["load_graph", "write_artifact"]


def backend_pbs_count(module: Any, plan: ShardPlan) -> int:
    """Bootstraps per inference as concrete counts them (exact rounding adds some)."""
    return sum(getattr(module, s.name).programmable_bootstrap_count * s.shards for s in plan.stages)


def _stage_json(stage: Stage) -> dict[str, Any]:
    return {
        "name": stage.name,
        "source": stage.source,
        "kind": stage.kind,
        "in_shape": list(stage.in_shape),
        "out_shape": list(stage.out_shape),
        "prefix": [list(p) for p in stage.prefix],
        "weight_shape": list(stage.weight.shape),
        "stride": stage.stride,
        "padding": stage.padding,
        "act": stage.act.to_json() if stage.act else None,
        "lsbs": stage.lsbs,
        "exact_rounding": stage.exact_rounding,
        "acc_range": list(stage.acc_range),
        "acc_bits": stage.acc_bits,
        "tlu_bits": stage.acc_bits - stage.lsbs if stage.act else 0,
        "pbs": stage.pbs_count,
    }


def write_artifact(
    out: str | Path,
    graph: IntGraph,
    plan: ShardPlan,
    module: Any,
    model_info: dict[str, Any],
    p_error: float,
    overwrite: bool = False,
) -> Manifest:
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        module.server.save(tmp / "server.zip")
        (tmp / "client.specs.json").write_bytes(module.client.specs.serialize())
        arrays = {}
        for stage in graph.stages:
            arrays[f"{stage.name}.w"] = stage.weight_matrix()
            arrays[f"{stage.name}.b"] = stage.bias
        with open(tmp / "weights.npz", "wb") as f:
            np.savez(f, **arrays)
        files = {n: file_sha256(tmp / n) for n in ("server.zip", "client.specs.json", "weights.npz")}
        manifest = {
            "format": "gravel-artifact",
            "format_version": FORMAT_VERSION,
            "gravel_version": version("gravel"),
            "backend": {"name": "concrete", "concrete_python": concrete_version(), "p_error": p_error},
            "model": model_info,
            "input": {
                "shape": list(graph.input_shape),
                "dtype": "float32",
                "range": [0.0, 1.0],
                "bits": graph.input_bits,
            },
            "output": {
                "num_classes": int(len(graph.output_scale)),
                "scale": [float(v) for v in graph.output_scale],
                "offset": [float(v) for v in graph.output_offset],
            },
            "stages": [_stage_json(s) for s in graph.stages],
            "plan": plan.to_json(),
            "stats": {
                "pbs_count": backend_pbs_count(module, plan),
                "table_lookups": plan.pbs_count,
                "eval_key_bytes_estimate": int(module.size_of_bootstrap_keys + module.size_of_keyswitch_keys),
            },
            "files": files,
        }
        if fused_compatible(module, graph):
            manifest["fused"] = {"function": FUSED}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_manifest(out, role="all")


def load_graph(manifest: Manifest) -> IntGraph:
    """The clear integer graph of an artifact, for reference predictions (check, bench)."""
    with np.load(manifest.path("weights.npz"), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    stages = []
    for row in manifest.stages:
        w = arrays[f"{row['name']}.w"]
        if row["kind"] == "conv":
            w = np.ascontiguousarray(w.T.reshape(row["weight_shape"]))
        act = Activation(**row["act"]) if row["act"] else None
        stages.append(
            Stage(
                name=row["name"],
                source=row["source"],
                kind=row["kind"],
                in_shape=tuple(row["in_shape"]),
                prefix=[tuple(p) for p in row["prefix"]],
                weight=w,
                bias=arrays[f"{row['name']}.b"],
                stride=row["stride"],
                padding=row["padding"],
                act=act,
                lsbs=row["lsbs"],
                acc_range=tuple(row["acc_range"]),
                acc_bits=row["acc_bits"],
                exact_rounding=row["exact_rounding"],
            )
        )
    out = manifest.output
    return IntGraph(
        tuple(manifest.input["shape"]),
        manifest.input["bits"],
        stages,
        np.asarray(out["scale"]),
        np.asarray(out["offset"]),
    )
