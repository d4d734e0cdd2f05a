"""Partition an integer program into stages, and cut stages into shards.

A stage ends at a table lookup (a `lut`, a `maxpool`), at a value read by several nodes, or at
the output: each stage is one function of the backend program, reading the outputs of earlier
stages (or the client's input) and producing one tensor. A stage of the form
"data movement -> Gemm/Conv -> lookup" on a single input is shardable: its output channels are
independent, so equal slices of them run as shards. Where the lookup is the same for every
channel, the shards are one compiled function that takes the slice's weights and bias as clear
arguments; where it differs per channel (per-channel scales), each shard is a function of its
own with its slice's constants compiled in. Any other stage is one shard. Shards of a stage have equal sizes (a divisor of its
channel count), so their costs are equal by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gravel.compiler.qgraph import QGraph, QNode
from gravel.protocol.manifest import shard_columns, shard_function

__all__ = ["DEFAULT_MAX_SHARDS", "ShardPlan", "Stage", "StagePlan", "make_plan", "partition", "shard_weights"]

# One shard per stage: what one process runs fastest (the artifact's fused function, one backend
# call). Compile with as many shards as the workers that will share one inference.
DEFAULT_MAX_SHARDS = 1
INPUT = "input"
_MOVES = ("reshape", "transpose", "pad", "sumpool")


@dataclass
class Stage:
    """One function of the program: `nodes` in order, the last producing the stage's output."""

    name: str
    nodes: list[QNode]
    inputs: list[str]  # stage names (or "input") whose outputs this stage reads, in argument order
    reads: list[str]  # the integer node each of `inputs` stands for

    @property
    def output(self) -> QNode:
        return self.nodes[-1]

    @property
    def linear(self) -> QNode | None:
        found = [n for n in self.nodes if n.op == "linear"]
        return found[0] if len(found) == 1 else None

    @property
    def shardable(self) -> bool:
        """Data movement, then one Gemm/Conv, then per-channel steps ending in a lookup: the
        lookup itself, or a residual join (`add`) with a same-shaped tensor another stage made."""
        lin = self.linear
        if lin is None or self.output.op != "lut":
            return False
        if len(lin.shape) != 1 and lin.attrs["kind"] == "gemm":
            return False
        ops = [n.op for n in self.nodes]
        k = ops.index("linear")
        if not all(op in _MOVES for op in ops[:k]):
            return False
        path = {lin.name}
        for node in self.nodes[k + 1 :]:
            if node.op not in ("lut", "add") or node.shape != lin.shape:
                return False
            others = [i for i in node.inputs if i not in path]
            if node.op == "lut" and others or node.op == "add" and any(i not in self.reads for i in others):
                return False
            path.add(node.name)
        # the Gemm/Conv's own input path reads one tensor; joins read theirs from other stages
        members = {n.name for n in self.nodes[: k + 1]}
        return len({i for n in self.nodes[: k + 1] for i in n.inputs if i not in members}) == 1

    @property
    def joins(self) -> bool:
        """Whether a residual join follows the Gemm/Conv (its other operand is cut per shard)."""
        return any(n.op == "add" for n in self.nodes)

    @property
    def uniform(self) -> bool:
        """Whether the stage's lookup is one table for all channels (else per channel)."""
        lut = self.output.attrs
        params = lut.get("params") or {}
        return all(np.ndim(v) == 0 for v in [lut["in_scale"], lut["in_offset"], *params.values()])

    @property
    def channels(self) -> int:
        return self.output.shape[0]

    @property
    def lookups(self) -> int:
        return sum(n.lookups for n in self.nodes)


def partition(graph: QGraph) -> list[Stage]:
    """Stages in execution order."""
    users: dict[str, list[QNode]] = {n.name: [] for n in graph.nodes}
    for n in graph.nodes:
        for i in n.inputs:
            users[i].append(n)
    cuts = {graph.output}
    for n in graph.nodes:
        if n.op in ("lut", "maxpool") or len(users[n.name]) > 1:
            cuts.add(n.name)
    cuts.discard(INPUT)
    owner: dict[str, str] = {INPUT: INPUT}
    stages: list[Stage] = []
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        if n.name not in cuts:
            continue
        members: set[str] = set()
        stack = [n.name]
        while stack:
            m = stack.pop()
            if m in members or m == INPUT or (m in cuts and m != n.name):
                continue
            members.add(m)
            stack.extend(by_name[m].inputs)
        nodes = [x for x in graph.nodes if x.name in members]
        reads: list[str] = []
        for x in nodes:
            for i in x.inputs:
                if i not in members and i not in reads:
                    reads.append(i)
        name = f"stage{len(stages)}"
        for x in nodes:
            owner[x.name] = name
        stages.append(Stage(name, nodes, [owner[r] for r in reads], reads))
    # the client encrypts one input for one function: a second reader gets it through a relay
    readers = [s for s in stages if INPUT in s.inputs]
    if len(readers) > 1:
        relay = Stage("relay", [], [INPUT], [INPUT])
        for s in readers:
            s.inputs = ["relay" if i == INPUT else i for i in s.inputs]
        stages.insert(0, relay)
        renamed = {s.name: f"stage{k}" for k, s in enumerate(stages)}  # one pass: no name collides
        for s in stages:
            s.name = renamed[s.name]
            s.inputs = [renamed.get(i, i) for i in s.inputs]
    return stages


@dataclass(frozen=True)
class StagePlan:
    name: str
    inputs: tuple[str, ...]  # stages (or "input") whose shard outputs are this stage's arguments
    in_parts: int  # encrypted arguments: all shards of every input, in order
    shards: int
    shard_size: int  # output channels per shard
    pbs_per_shard: int
    shardable: bool  # the shards share one function that takes their weights as clear arguments
    functions: tuple[str, ...] = ()  # else, where sharded: one function per shard (protocol.shard_function)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "in_parts": self.in_parts,
            "shards": self.shards,
            "shard_size": self.shard_size,
            "pbs_per_shard": self.pbs_per_shard,
            "shardable": self.shardable,
            "functions": list(self.functions),
        }

    def function(self, shard: int) -> str:
        """The backend function of shard `shard` (the rule is protocol.manifest.shard_function's)."""
        return shard_function({"name": self.name, "functions": self.functions}, shard)


@dataclass(frozen=True)
class ShardPlan:
    stages: tuple[StagePlan, ...]

    def to_json(self) -> list[dict]:
        return [s.to_json() for s in self.stages]

    @staticmethod
    def from_json(rows: list[dict]) -> ShardPlan:
        return ShardPlan(tuple(StagePlan(**{**row, "inputs": tuple(row["inputs"]),
                                            "functions": tuple(row.get("functions", ()))}) for row in rows))

    @property
    def pbs_count(self) -> int:
        return sum(s.shards * s.pbs_per_shard for s in self.stages)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def make_plan(stages: list[Stage], max_shards: int = DEFAULT_MAX_SHARDS, per_channel: bool = True) -> ShardPlan:
    """Shards per stage, at most `max_shards`; `per_channel=False` keeps stages whose lookup
    differs per channel in one shard (they would need a function per shard)."""
    rows = []
    shards_of = {INPUT: 1}
    for k, st in enumerate(stages):
        in_parts = sum(shards_of[i] for i in st.inputs)
        # the client decrypts one output: the last stage is never split
        if st.shardable and k < len(stages) - 1 and (per_channel or st.uniform):
            shards = _largest_divisor_at_most(st.channels, max_shards)
        else:
            shards = 1
        size = st.channels // shards if st.nodes else 0
        # one function for all shards needs the same lookup everywhere and nothing to slice but
        # the weights (a join's other operand is sliced per shard, inside the shard's function)
        shared = st.shardable and st.uniform and not st.joins
        own = tuple(f"{st.name}_{j}" for j in range(shards)) if shards > 1 and not shared else ()
        rows.append(StagePlan(st.name, tuple(st.inputs), in_parts, shards, size, st.lookups // shards, shared, own))
        shards_of[st.name] = shards
    return ShardPlan(tuple(rows))


def shard_weights(stage: Stage, shards: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The weight columns and bias of one shard of a shardable stage (protocol's rule)."""
    lin = stage.linear
    return shard_columns(lin.attrs["weight"], lin.attrs["bias"], shards, index)
