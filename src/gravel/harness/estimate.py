"""Latency estimates before the long compile, from a per-lookup cost measured on this machine.

A table lookup (programmable bootstrap) dominates TFHE inference and its cost depends on its
bit width. `lookup_cost(bits)` compiles a small circuit of 64 lookups at that width, runs it
encrypted a few times and caches the median seconds per lookup under ~/.cache/gravel, keyed
by the width, the CPU count and concrete's version, so a later `gravel check` is instant.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["estimate_latency", "lookup_cost"]

_PROBE_LOOKUPS = 64


def _cache_file() -> Path:
    root = Path(os.environ.get("GRAVEL_CACHE_DIR", Path.home() / ".cache" / "gravel"))
    return root / "lookup_cost.json"


def lookup_cost(bits: int, p_error: float = 0.01) -> float:
    """Median seconds of one table lookup on `bits` bits on this machine (measured once)."""
    key = f"{bits}:{p_error}:{os.cpu_count()}:{version('concrete-python')}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    from concrete import fhe

    hi = 2 ** (bits - 1) - 1

    def probe(x: Any) -> Any:
        return fhe.univariate(lambda v: np.clip(v * 3 // 2, -hi - 1, hi))(x)

    circuit = fhe.compiler({"x": "encrypted"})(probe).compile(
        [np.full(_PROBE_LOOKUPS, v) for v in (-hi - 1, hi)],
        fhe.Configuration(p_error=p_error, show_progress=False, dump_artifacts_on_unexpected_failures=False),
    )
    circuit.keygen()
    x = circuit.encrypt(np.zeros(_PROBE_LOOKUPS, dtype=np.int64))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        circuit.run(x)
        times.append(time.perf_counter() - t)
    cost = statistics.median(times) / _PROBE_LOOKUPS
    cache[key] = cost
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home only costs the measurement next time
    return cost


def estimate_latency(widths: dict[int, int], p_error: float = 0.01) -> float:
    """Seconds for `widths` = {lookup bit width: count} of lookups, one after another."""
    return sum(count * lookup_cost(bits, p_error) for bits, count in widths.items() if count)
