"""The service's settings, from `gravel serve` options or GRAVEL_* environment variables.

Each limit exists because a probe of the service found what happens without it (issue 10):
bodies are bounded by size and by time, key loads (the memory-hungry step) by count, the key
cache by bytes, each session's queue by items, and connections by count.
"""

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
    # Upper bounds; a deployed model's keys and inputs are also held to their exact measured size.
    # A 784-128-128-10 binarized MLP's keys are ~124 MB; one input ~20 kB (this bounds batches)
    max_key_bytes: int = field(default_factory=lambda: _env("GRAVEL_MAX_KEY_BYTES", 1024 * MiB))
    max_input_bytes: int = field(default_factory=lambda: _env("GRAVEL_MAX_INPUT_BYTES", 256 * MiB))
    max_artifact_bytes: int = field(default_factory=lambda: _env("GRAVEL_MAX_ARTIFACT_BYTES", 4096 * MiB))
    # Key uploads being received or checked at once (a check holds ~2x the keys in memory);
    # the next one is answered 503 with Retry-After.
    max_key_loads: int = field(default_factory=lambda: _env("GRAVEL_MAX_KEY_LOADS", 2))
    # Deserialized evaluation keys kept in the engine, by bytes (least recently used go first).
    key_cache_bytes: int = field(default_factory=lambda: _env("GRAVEL_KEY_CACHE_BYTES", 2048 * MiB))
    # Items one session may have queued or running; beyond it, 429.
    max_session_items: int = field(default_factory=lambda: _env("GRAVEL_MAX_SESSION_ITEMS", 4096))
    # A connection must finish its request headers within this, and a body may pause at most
    # this long between two chunks (408); idle keep-alive connections close after keep_alive_s.
    header_timeout_s: float = field(default_factory=lambda: _env("GRAVEL_HEADER_TIMEOUT_S", 10.0))
    body_timeout_s: float = field(default_factory=lambda: _env("GRAVEL_BODY_TIMEOUT_S", 30.0))
    keep_alive_s: int = field(default_factory=lambda: _env("GRAVEL_KEEP_ALIVE_S", 5))
    # Open connections at most (also kept under the open-file limit); when full, the oldest one
    # still sending its headers is dropped first, so slow clients cannot starve health checks.
    max_connections: int = field(default_factory=lambda: _env("GRAVEL_MAX_CONNECTIONS", 256))
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
        value = type(default)(raw)
    except ValueError:
        value = None
    if value is None or value < 0:
        from gravel.errors import GravelError

        raise GravelError(f"{name}={raw!r} is not a non-negative {type(default).__name__}")
    return value
