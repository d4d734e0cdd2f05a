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
    # a 784-128-128-10 binarized MLP's keys are ~124 MB; one input ~20 kB (this bounds batches)
    max_key_bytes: int = field(default_factory=lambda: _env("GRAVEL_MAX_KEY_BYTES", 1024 * MiB))
    max_input_bytes: int = field(default_factory=lambda: _env("GRAVEL_MAX_INPUT_BYTES", 256 * MiB))
    max_artifact_bytes: int = field(default_factory=lambda: _env("GRAVEL_MAX_ARTIFACT_BYTES", 4096 * MiB))
    # idle sessions (and their keys) are removed after this
    session_ttl_s: float = field(default_factory=lambda: _env("GRAVEL_SESSION_TTL_S", 24 * 3600.0))
    # finished results not fetched within this are removed
    result_ttl_s: float = field(default_factory=lambda: _env("GRAVEL_RESULT_TTL_S", 3600.0))
    # a fetched result stays this long, so that a cut download can be retried
    fetched_grace_s: float = field(default_factory=lambda: _env("GRAVEL_FETCHED_GRACE_S", 300.0))
    sweep_interval_s: float = field(default_factory=lambda: _env("GRAVEL_SWEEP_INTERVAL_S", 30.0))


def _env(name: str, default):
    """A number from the environment, of the default's type; a bad value is named."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return type(default)(raw)
    except ValueError:
        from gravel.errors import GravelError

        raise GravelError(f"{name}={raw!r} is not a number") from None
