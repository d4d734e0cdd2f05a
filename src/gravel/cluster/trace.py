"""What one inference did: per stage, per shard, where it ran and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["InferenceTrace", "ShardRecord"]


@dataclass
class ShardRecord:
    stage: str
    shard: int
    worker: int
    node: str
    pid: int
    attempt: int
    submitted: float  # wall-clock times (time.time), comparable across processes on one host
    started: float
    finished: float
    compute_s: float
    bytes_in: int
    bytes_out: int

    @property
    def queue_s(self) -> float:
        return max(0.0, self.started - self.submitted)


@dataclass
class InferenceTrace:
    started: float
    finished: float = 0.0
    shards: list[ShardRecord] = field(default_factory=list)
    retries: int = 0
    mode: str = "sharded"  # or "whole" (one backend call) / "data-parallel" (several whole ones)

    @property
    def latency_s(self) -> float:
        return self.finished - self.started

    @property
    def compute_s(self) -> float:
        return sum(r.compute_s for r in self.shards)

    @property
    def nodes(self) -> set[str]:
        return {r.node for r in self.shards}

    def stage_critical_path(self) -> dict[str, float]:
        """Per stage, the slowest shard's compute time."""
        out: dict[str, float] = {}
        for r in self.shards:
            out[r.stage] = max(out.get(r.stage, 0.0), r.compute_s)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "compute_s": self.compute_s,
            "retries": self.retries,
            "mode": self.mode,
            "shards": [asdict(r) | {"queue_s": r.queue_s} for r in self.shards],
        }
