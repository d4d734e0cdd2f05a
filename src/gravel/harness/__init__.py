"""Harnesses that play every role in one process: accuracy checks and benchmarks."""

from gravel.harness.bench import bench, format_bench
from gravel.harness.check import check, format_check

__all__ = ["bench", "check", "format_bench", "format_check"]
