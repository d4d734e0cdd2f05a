"""The shard plan: how each stage's output channels are cut into independent shards.

All shards of a stage have the same size (a divisor of its channel count), so one compiled
function serves them all with the shard's weights as clear arguments, and their costs (table
lookups) are equal by construction. The output stage has no table lookups and stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gravel.compiler.graph import IntGraph, Stage

__all__ = ["DEFAULT_MAX_SHARDS", "ShardPlan", "StagePlan", "make_plan"]

DEFAULT_MAX_SHARDS = 16


@dataclass(frozen=True)
class StagePlan:
    name: str
    in_parts: int  # encrypted arguments: the previous stage's shard outputs
    shards: int
    shard_size: int  # output channels per shard
    pbs_per_shard: int

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "in_parts": self.in_parts,
            "shards": self.shards,
            "shard_size": self.shard_size,
            "pbs_per_shard": self.pbs_per_shard,
        }


@dataclass(frozen=True)
class ShardPlan:
    stages: tuple[StagePlan, ...]

    def to_json(self) -> list[dict]:
        return [s.to_json() for s in self.stages]

    @staticmethod
    def from_json(rows: list[dict]) -> ShardPlan:
        return ShardPlan(tuple(StagePlan(**row) for row in rows))

    @property
    def pbs_count(self) -> int:
        return sum(s.shards * s.pbs_per_shard for s in self.stages)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def make_plan(graph: IntGraph, max_shards: int = DEFAULT_MAX_SHARDS) -> ShardPlan:
    rows = []
    in_parts = 1
    for stage in graph.stages:
        shards = 1 if stage.act is None else _largest_divisor_at_most(stage.out_channels, max_shards)
        size = stage.out_channels // shards
        rows.append(StagePlan(stage.name, in_parts, shards, size, size * stage.positions if stage.act else 0))
        in_parts = shards
    return ShardPlan(tuple(rows))


def shard_weights(stage: Stage, shards: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The contiguous weight columns and bias of one shard.

    Contiguity matters: concrete-python 2.11 misreads non-contiguous numpy views passed as
    clear arguments (a column slice gives wrong results without any error).
    """
    size = stage.out_channels // shards
    cols = slice(index * size, (index + 1) * size)
    w = np.ascontiguousarray(stage.weight_matrix()[:, cols], dtype=np.int64)
    return w, np.ascontiguousarray(stage.bias[cols], dtype=np.int64)
