"""Partition an integer program into stages, and cut stages into shards.

A stage ends at a table lookup (a `lut`, a `maxpool`), at a value read by several nodes, or at
the output: each stage is one function of the backend program, reading the outputs of earlier
stages (or the client's input) and producing one tensor. A stage of the form
"data movement -> Gemm/Conv -> lookup" on a single input is shardable: its output channels are
independent, so equal slices of them run as shards, each a function of its own with its
slice's constants compiled in. (One function taking a shard's weights as clear arguments would
compile once per stage, but concrete bounds the noise of a product with a clear argument by the
argument's bit width, not by the weights' values: that gave the ResNet-style CNN's whole key
set 3-level bootstraps where compiled-in constants give 2, about a third more time per lookup
on every path, one process included.) Any other stage is one shard. Shards of a stage have
equal sizes (a divisor of its channel count), so their costs are equal by construction.

A lookup-free output stage (the final Gemm, say, after global pooling) would cost a backend
call of its own after a gather, although it is an affine map of the stage it reads: when that
stage is split, the output stage folds into it (`fold_output`). Each shard then ends with its
rows of that map, A[rows of its channels] and the bias once, and returns a partial output;
the client adds the parts after decryption (exact: they are integers). One backend call and
one gather fewer per inference.

With `tiles` (compile --tiles), runs of convolutional stages merge into one stage split by rows
instead (tiles.py): each shard computes its rows of the run's last output from the rows of the
run's inputs they depend on, the halo computed by both neighbours; the stages that read it join
its shards' outputs on the row axis (`Stage.in_axes`, the plan row's `axis`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from gravel.compiler.qgraph import NumpyBackend, QGraph, QNode, run_node
from gravel.compiler.tiles import MAX_HALO_OVERHEAD, group_tiles, slowest_tile, tile_rows
from gravel.protocol.manifest import shard_function, shard_slice

__all__ = ["DEFAULT_MAX_SHARDS", "ShardPlan", "Stage", "StagePlan", "fold_output", "make_plan",
           "merge_tiles", "partition", "plan_stages", "shard_weights"]

# One shard per stage: what one process runs fastest (the artifact's fused function, one backend
# call). Compile with as many shards as the workers that will share one inference.
DEFAULT_MAX_SHARDS = 1
INPUT = "input"
_MOVES = ("reshape", "transpose", "pad", "sumpool")
# the affine tail of a folded output stage is found by evaluating it on a basis: inputs larger
# than this many elements (a matrix of this size squared) are not folded
MAX_FOLD_INPUTS = 8192


@dataclass
class Stage:
    """One function of the program: `nodes` in order, the last producing the stage's output.

    `tail` counts trailing nodes folded in from a lookup-free output stage (`fold_output`): the
    stage's `body` ends at its lookup, and a shard of it returns its part of the tail's output."""

    name: str
    nodes: list[QNode]
    inputs: list[str]  # stage names (or "input") whose outputs this stage reads, in argument order
    reads: list[str]  # the integer node each of `inputs` stands for
    tail: int = 0
    tiles: int = 0  # > 0: consecutive convolutional stages merged, split in row tiles (tiles.py)
    in_axes: list[int] | None = None  # per input: the axis its shards' outputs join on (1: row tiles)
    merged: int = 1  # stages of `partition` this one stands for

    def in_axis(self, k: int) -> int:
        return self.in_axes[k] if self.in_axes else 0

    @property
    def output(self) -> QNode:
        return self.nodes[-1]

    @property
    def body(self) -> list[QNode]:
        """The nodes up to the stage's lookup (all of them, where no output stage folded in)."""
        return self.nodes[: len(self.nodes) - self.tail]

    @cached_property
    def tail_map(self) -> tuple[np.ndarray, np.ndarray]:
        """The folded tail as one exact integer affine map of the body's flattened output:
        (A, c) with tail(x) = flatten(x) @ A + c, found by evaluating the tail on a basis."""
        return affine_map(self.body[-1], self.nodes[len(self.body):])

    @property
    def linear(self) -> QNode | None:
        found = [n for n in self.body if n.op == "linear"]
        return found[0] if len(found) == 1 else None

    @property
    def shardable(self) -> bool:
        """Data movement, then one Gemm/Conv, then per-channel steps ending in a lookup: the
        lookup itself, or a residual join (`add`) with a same-shaped tensor another stage made."""
        lin = self.linear
        body = self.body
        if lin is None or body[-1].op != "lut" or self.tiles:
            return False
        if len(lin.shape) != 1 and lin.attrs["kind"] == "gemm":
            return False
        ops = [n.op for n in body]
        k = ops.index("linear")
        if not all(op in _MOVES for op in ops[:k]):
            return False
        path = {lin.name}
        for node in body[k + 1 :]:
            if node.op not in ("lut", "add") or node.shape != lin.shape:
                return False
            others = [i for i in node.inputs if i not in path]
            if node.op == "lut" and others or node.op == "add" and any(i not in self.reads for i in others):
                return False
            path.add(node.name)
        # the Gemm/Conv's own input path reads one tensor; joins read theirs from other stages
        members = {n.name for n in body[: k + 1]}
        return len({i for n in body[: k + 1] for i in n.inputs if i not in members}) == 1

    @property
    def channels(self) -> int:
        return self.body[-1].shape[0]

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


def affine_map(source: QNode, tail: list[QNode]) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) such that evaluating `tail` on the output x of `source` gives flatten(x) @ A + c,
    exactly; ValueError where the tail is not affine in x (checked on random integers)."""
    backend = NumpyBackend()
    n = math.prod(source.shape)

    def run(x: np.ndarray) -> np.ndarray:
        values = {source.name: x.reshape((len(x),) + tuple(source.shape))}
        for node in tail:
            if any(i not in values for i in node.inputs):
                raise ValueError(f"{node.where} reads a tensor from outside the folded tail")
            values[node.name] = run_node(node, [values[i] for i in node.inputs], backend)
        return np.asarray(values[tail[-1].name], dtype=np.int64).reshape(len(x), -1)

    basis = np.concatenate([np.zeros((1, n), dtype=np.int64), np.eye(n, dtype=np.int64)])
    out = run(basis)
    c, a = out[0], out[1:] - out[0]
    probe = np.random.default_rng(0).integers(-64, 64, size=(4, n), dtype=np.int64)
    if not np.array_equal(run(probe), probe @ a + c):
        raise ValueError("the tail is not an affine map of its input")
    return a, c


def fold_output(stages: list[Stage], max_shards: int) -> list[Stage]:
    """Fold a lookup-free output stage into the stage it reads, where that stage will be split
    into shards: each shard then returns a partial output (its rows of the output stage's affine
    map) and the client adds the parts. Stages are returned unchanged where this does not apply:
    the output stage has lookups, products or maxima, reads anything else, or is not affine."""
    if len(stages) < 2 or max_shards < 2:
        return stages
    prev, last = stages[-2], stages[-1]
    if (prev.tail or not prev.shardable or last.inputs != [prev.name] or last.reads != [prev.output.name]
            or any(n.op in ("lut", "maxpool", "mul") for n in last.nodes)
            or _largest_divisor_at_most(prev.channels, max_shards) < 2
            or math.prod(prev.output.shape) > MAX_FOLD_INPUTS):
        return stages
    merged = replace(prev, nodes=prev.nodes + last.nodes, tail=len(last.nodes))
    try:
        merged.tail_map  # noqa: B018 - computed once here; refuses a tail that is not affine
    except ValueError:
        return stages
    return stages[:-2] + [merged]


@dataclass(frozen=True)
class StagePlan:
    name: str
    inputs: tuple[str, ...]  # stages (or "input") whose shard outputs are this stage's arguments
    in_parts: int  # encrypted arguments: all shards of every input, in order
    shards: int
    shard_size: int  # output channels per shard
    pbs_per_shard: int
    functions: tuple[str, ...] = ()  # where sharded: one function per shard (protocol.shard_function)
    partial: bool = False  # the last stage's shards return partial outputs, which the client adds
    axis: int = 0  # the axis its shards' outputs join on: 0 output channels, 1 rows (tiles)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "in_parts": self.in_parts,
            "shards": self.shards,
            "shard_size": self.shard_size,
            "pbs_per_shard": self.pbs_per_shard,
            "functions": list(self.functions),
            "partial": self.partial,
            "axis": self.axis,
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


def make_plan(stages: list[Stage], max_shards: int = DEFAULT_MAX_SHARDS) -> ShardPlan:
    """Shards per stage, at most `max_shards`; each shard of a split stage is a function of
    its own (a row tile, or a slice of the output channels)."""
    rows = []
    shards_of = {INPUT: 1}
    for k, st in enumerate(stages):
        in_parts = sum(shards_of[i] for i in st.inputs)
        # the client decrypts one output, or adds the partial outputs of a folded tail's shards:
        # the last stage is split only where it has such a tail
        own_rows = bool(st.tail)
        last = k == len(stages) - 1
        if st.tiles and max_shards >= st.tiles:  # row tiles
            rows_each = max(b - a for a, b in tile_rows(st.output.shape[1], st.tiles))  # the tallest tile
            own = tuple(f"{st.name}_{j}" for j in range(st.tiles))
            rows.append(StagePlan(st.name, tuple(st.inputs), in_parts, st.tiles, rows_each,
                                  slowest_tile(st.nodes, st.output.name, st.tiles), own, axis=1))
            shards_of[st.name] = st.tiles
            continue
        if st.shardable and (not last or own_rows):
            shards = _largest_divisor_at_most(st.channels, max_shards)
        else:
            shards = 1
        size = st.channels // shards if st.nodes else 0
        own = tuple(f"{st.name}_{j}" for j in range(shards)) if shards > 1 else ()
        rows.append(StagePlan(st.name, tuple(st.inputs), in_parts, shards, size, st.lookups // shards, own,
                              partial=own_rows and shards > 1))
        shards_of[st.name] = shards
    return ShardPlan(tuple(rows))


def plan_stages(graph: QGraph, max_shards: int = DEFAULT_MAX_SHARDS,
                tiles: bool = False) -> tuple[list[Stage], ShardPlan]:
    """Partition; with `tiles`, merge runs of convolutional stages into row-tiled stages
    (tiles.py); fold a lookup-free output stage into a split stage before it; and plan the
    shards."""
    stages = partition(graph)
    if tiles:
        stages = merge_tiles(stages, max_shards)
    stages = fold_output(stages, max_shards)
    return stages, make_plan(stages, max_shards)


def merge_tiles(stages: list[Stage], tiles: int, max_overhead: float = MAX_HALO_OVERHEAD) -> list[Stage]:
    """Each run of `group_tiles` as one stage of `tiles` row tiles; stages renumbered, and the
    readers of a tiled stage told to join its shards' outputs on the row axis."""
    runs = group_tiles(stages, tiles, max_overhead)
    if not runs:
        return stages
    merged: list[Stage] = []
    renamed: dict[str, str] = {}
    starts = {run[0]: run for run in runs}
    k = 0
    while k < len(stages):
        run = starts.get(k, [k])
        members = [stages[j] for j in run]
        names = {m.name for m in members}
        pairs = [(i, r) for m in members for i, r in zip(m.inputs, m.reads) if i not in names]
        pairs = list(dict.fromkeys(pairs))
        st = Stage(f"stage{len(merged)}", [n for m in members for n in m.nodes], [i for i, _ in pairs],
                   [r for _, r in pairs], tail=members[-1].tail, tiles=tiles if len(run) > 1 else 0,
                   merged=len(run))
        for m in members:
            renamed[m.name] = st.name
        merged.append(st)
        k = run[-1] + 1
    tiled = {st.name for st in merged if st.tiles}
    for st in merged:
        st.inputs = [renamed.get(i, i) for i in st.inputs]
        st.in_axes = [1 if i in tiled else 0 for i in st.inputs]
    return merged


def shard_weights(stage: Stage, shards: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The weight columns and bias of shard `index` of `shards` of a stage: its contiguous
    slice of the output channels (protocol.shard_slice, the order readers concatenate in)."""
    lin = stage.linear
    cols = shard_slice(lin.attrs["weight"].shape[1], shards, index)
    return (np.ascontiguousarray(lin.attrs["weight"][:, cols], dtype=np.int64),
            np.ascontiguousarray(lin.attrs["bias"][cols], dtype=np.int64))
