"""Harnesses that play every role in one process: accuracy checks and benchmarks."""

from gravel.harness.bench import bench
from gravel.harness.check import check

__all__ = ["bench", "check"]
