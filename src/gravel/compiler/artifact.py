"""Write a compiled model as an artifact directory, and read its integer program back.

The directory is built next to its destination and renamed into place, so an interrupted or
failed compile never leaves a half-written artifact, and an existing one is replaced only when
asked and only once the new one is complete. The integer program is JSON in the manifest with
its arrays in `weights.npz` (read with allow_pickle=False): nothing in an artifact is a pickle.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from gravel.compiler.plan import INPUT, ShardPlan, Stage
from gravel.compiler.program import FUSED, fused_compatible, input_compatible
from gravel.compiler.qgraph import QGraph, QNode
from gravel.errors import ArtifactError, ModelError
from gravel.protocol.manifest import (
    FORMAT_VERSION, Manifest, concrete_version, file_sha256, load_manifest, publish_directory,
)

__all__ = ["load_graph", "load_program", "write_artifact"]


def backend_pbs_count(module: Any, plan: ShardPlan) -> int:
    """Bootstraps per inference as concrete counts them (exact rounding adds some)."""
    return sum(getattr(module, s.function(0)).programmable_bootstrap_count * s.shards for s in plan.stages)


def _encode(value: Any, key: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON form of an attribute; arrays go to `arrays` under `key` and leave a reference."""
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, dict):
        return {k: _encode(v, f"{key}.{k}", arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{key}.{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.floating):
        return float(value)
    return value


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            try:
                return arrays[value["__array__"]]
            except KeyError:
                raise ArtifactError(f"weights.npz lacks the array {value['__array__']!r}") from None
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


_TUPLE_ATTRS = ("in_shape", "kernel", "strides", "pads", "dilations", "perm", "shape")


def program_json(graph: QGraph, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    nodes = [
        {
            "name": n.name, "op": n.op, "inputs": list(n.inputs), "source": n.source, "shape": list(n.shape),
            "range": [n.lo, n.hi], "attrs": _encode(n.attrs, n.name, arrays),
        }
        for n in graph.nodes
    ]
    return {"nodes": nodes, "output": graph.output, "notes": graph.notes}


def write_artifact(
    out: str | Path,
    graph: QGraph,
    stages: list[Stage],
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
        arrays: dict[str, np.ndarray] = {}
        program = program_json(graph, arrays)
        with open(tmp / "weights.npz", "wb") as f:
            np.savez(f, **arrays)
        files = {n: file_sha256(tmp / n) for n in ("server.zip", "client.specs.json", "weights.npz")}
        first = next(r for r in plan.stages if INPUT in r.inputs).function(0)
        if not input_compatible(module, plan):  # pipeline.lower falls back before this
            raise ModelError("the first stage's shard functions read the client's input in different encodings; "
                             "compile with --shards 1")
        fused = fused_compatible(module, plan)
        manifest = {
            "format": "gravel-artifact",
            "format_version": FORMAT_VERSION,
            "gravel_version": version("gravel"),
            "backend": {"name": "concrete", "concrete_python": concrete_version(), "p_error": p_error},
            "model": model_info,
            "input": dict(graph.input_quant, range=[graph.input_quant["lo"], _hi(graph.input_quant)]),
            "output": {
                "num_classes": int(len(graph.output_scale)),
                "scale": [float(v) for v in graph.output_scale],
                "offset": [float(v) for v in graph.output_offset],
            },
            "io": _io(plan, first, fused),
            "program": program,
            "stages": [
                {"name": s.name, "nodes": [n.name for n in s.nodes], "inputs": list(s.inputs), "reads": list(s.reads),
                 "lookups": s.lookups, "source": ", ".join(dict.fromkeys(n.source for n in s.nodes)),
                 "tail": s.tail, "tiles": s.tiles, "in_axes": [s.in_axis(k) for k in range(len(s.inputs))]}
                for s in stages
            ],
            "plan": plan.to_json(),
            "stats": {
                "pbs_count": backend_pbs_count(module, plan),
                "table_lookups": plan.pbs_count,
                "eval_key_bytes_estimate": int(module.size_of_bootstrap_keys + module.size_of_keyswitch_keys),
            },
            "files": files,
        }
        if fused:
            manifest["fused"] = {"function": FUSED}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_manifest(out, role="all")


def _io(plan: ShardPlan, first: str, fused: bool) -> dict[str, Any]:
    """Which functions the client encrypts for and decrypts from (see
    Manifest.output_functions): a last stage split into partial outputs returns one part per
    shard; one process returns the fused function's single output, where there is one."""
    last = plan.stages[-1]
    if not last.partial:
        return {"input_function": first, "output_function": last.name}
    io = {"input_function": first, "output_parts": [last.function(j) for j in range(last.shards)]}
    return {**io, "output_function": FUSED} if fused else io


def _hi(iq: dict[str, Any]) -> float:
    return float(iq["lo"]) + float(iq["step"]) * (2 ** int(iq["bits"]) - 1)


def load_program(manifest: Manifest) -> tuple[QGraph, list[Stage]]:
    """The integer program and its stages, from an artifact (server side: weights.npz)."""
    with np.load(manifest.path("weights.npz"), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    data = manifest.data["program"]
    nodes = []
    for row in data["nodes"]:
        attrs = _decode(row["attrs"], arrays)
        for key in _TUPLE_ATTRS:
            if key in attrs and isinstance(attrs[key], list):
                attrs[key] = tuple(attrs[key])
        nodes.append(QNode(row["name"], row["op"], tuple(row["inputs"]), attrs, row["source"], tuple(row["shape"]),
                           row["range"][0], row["range"][1]))
    out = manifest.output
    inp = {k: v for k, v in manifest.input.items() if k != "range"}
    graph = QGraph(nodes, data["output"], tuple(inp["shape"]), inp, np.asarray(out["scale"]),
                   np.asarray(out["offset"]), notes=list(data.get("notes", [])))
    by_name = {n.name: n for n in nodes}
    stages = [Stage(s["name"], [by_name[n] for n in s["nodes"]], list(s["inputs"]), list(s["reads"]),
                    tail=s.get("tail", 0), tiles=s.get("tiles", 0), in_axes=s.get("in_axes"))
              for s in manifest.stages]
    return graph, stages


def load_graph(manifest: Manifest) -> QGraph:
    """The clear integer program of an artifact, for reference predictions (check, bench)."""
    return load_program(manifest)[0]
