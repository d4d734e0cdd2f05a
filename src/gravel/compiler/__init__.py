"""Model owner's side: import, quantize and compile a model into an artifact directory.

The passes, in order: import (`importers`: ONNX files from both torch exporters, nn.Module,
Gravel checkpoints) -> canonicalise (`passes`) -> quantize (`quantize`) -> partition and plan
shards (`plan`) -> lower to concrete (`program`) -> artifact (`artifact`). `pipeline` runs them.
"""

from __future__ import annotations

from gravel.compiler.artifact import load_graph, load_program
from gravel.compiler.ir import Graph, Node, evaluate
from gravel.compiler.pipeline import Compiled, Finetune, build, compile_graph, import_model, lower
from gravel.compiler.plan import DEFAULT_MAX_SHARDS, ShardPlan, make_plan, partition, plan_stages
from gravel.compiler.program import DEFAULT_P_ERROR, compile_program
from gravel.compiler.qgraph import QGraph
from gravel.compiler.quantize import QuantConfig, quantize

__all__ = [
    "DEFAULT_MAX_SHARDS",
    "DEFAULT_P_ERROR",
    "Compiled",
    "Finetune",
    "Graph",
    "Node",
    "QGraph",
    "QuantConfig",
    "ShardPlan",
    "build",
    "compile_model",
    "compile_program",
    "evaluate",
    "import_model",
    "load_graph",
    "load_program",
    "lower",
    "make_plan",
    "partition",
    "plan_stages",
    "quantize",
]

# The public name of the whole compile (model in, artifact directory out).
compile_model = compile_graph
