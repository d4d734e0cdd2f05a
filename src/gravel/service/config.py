"""The service's settings, from `gravel serve` options or GRAVEL_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServiceConfig"]

MiB = 1 << 20


@dataclass
class ServiceConfig:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("GRAVEL_DATA_DIR", "gravel-data")))
    admin_token: str | None = field(default_factory=lambda: os.environ.get("GRAVEL_ADMIN_TOKEN") or None)
    executor: str = field(default_factory=lambda: os.environ.get("GRAVEL_EXECUTOR", "ray"))
    ray_address: str | None = field(default_factory=lambda: os.environ.get("RAY_ADDRESS") or None)
    workers: int | None = None
    max_key_bytes: int = 1024 * MiB  # a 784-128-128-10 binarized MLP's keys are ~124 MB
    max_input_bytes: int = 256 * MiB  # one input is ~20 kB; this bounds batches
    max_artifact_bytes: int = 4096 * MiB
    session_ttl_s: float = 24 * 3600.0  # idle sessions (and their keys) are removed after this
    result_ttl_s: float = 3600.0  # finished results not fetched within this are removed
    fetched_grace_s: float = 300.0  # a fetched result stays this long, so a cut download can retry
    sweep_interval_s: float = 30.0
