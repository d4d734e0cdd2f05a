"""Prometheus metrics of one service instance (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gravel_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "gravel_request_seconds", "HTTP request latency", ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.bytes_in = Counter("gravel_request_bytes", "Request body bytes", ["route"], registry=self.registry)
        self.bytes_out = Counter("gravel_response_bytes", "Response body bytes", ["route"], registry=self.registry)
        self.queue_depth = Gauge("gravel_queue_depth", "Inference jobs waiting or running", registry=self.registry)
        self.inference = Histogram(
            "gravel_inference_seconds", "Engine time per encrypted inference (one item of a request or job)", registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
        )
        self.jobs = Counter("gravel_jobs", "Finished inference jobs", ["status"], registry=self.registry)
        self.sessions = Gauge("gravel_sessions", "Open sessions", registry=self.registry)
        self.key_cache_bytes = Gauge("gravel_key_cache_bytes", "Evaluation keys held loaded by the engine",
                                     registry=self.registry)
        self.key_cache_sessions = Gauge("gravel_key_cache_sessions", "Sessions whose keys the engine holds loaded",
                                        registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
