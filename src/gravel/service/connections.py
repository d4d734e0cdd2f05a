"""The HTTP server around the app: uvicorn, with a header timeout and a connection cap.

uvicorn bounds the time between two requests on a kept-alive connection (keep_alive_s) but not
the time a client takes to send its request headers, so a client that sends them a byte at a
time holds its connection, and a file descriptor, forever; with a low open-file limit, 50 such
clients starved health checks. Here each connection must complete its headers within
`header_timeout_s` of opening (or of its previous answer), and at most `max_connections` are
open; when a connection beyond the cap arrives, the oldest connection still sending headers is
dropped for it, and only if there is none is the newcomer refused. The cap and the listen
backlog are kept under the open-file limit: asyncio accepts up to `backlog` connections in one
go before any of them can be dropped, so the descriptors in use stay under
base + cap + 2 x backlog, with the store's own files in the base. Slow bodies are bounded by
the routes themselves (`body_timeout_s`, answered 408; see gravel.service.bodies).
"""

from __future__ import annotations

import asyncio
import logging
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gravel.service.config import ServiceConfig

__all__ = ["GuardedH11Protocol", "connection_limits", "serve"]

log = logging.getLogger("gravel.service")

FD_BASE = 48  # descriptors kept for SQLite, blob files, logs, the event loop and Ray
MAX_HEADER_BYTES = 16 << 10


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the header timeout and the connection cap above; the two
    settings are class attributes, set on a subclass by `serve`."""

    header_timeout_s: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > self.max_connections:
            self._shed()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_since is not None and self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # waiting for the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- internals ----------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._waiting_since = self.loop.time()
        if self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._waiting_since = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_since is not None and not self.transport.is_closing():
            self.transport.close()

    def _shed(self) -> None:
        """Over the cap: drop the connection that has waited longest for its headers."""
        waiting = [c for c in self.connections
                   if c is not self and getattr(c, "_waiting_since", None) is not None]
        if waiting:
            oldest = min(waiting, key=lambda c: c._waiting_since)
            oldest.transport.close()
        else:
            log.warning("connection refused: %d connections open, all busy", len(self.connections) - 1)
            self.transport.close()


def connection_limits(configured: int) -> tuple[int, int]:
    """(connection cap, listen backlog): the configured cap, lowered so that the cap plus two
    accept bursts fit under this process's open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = configured
    if soft != resource.RLIM_INFINITY:
        cap = max(4, min(configured, (soft - FD_BASE) // 2))
    return cap, max(4, min(2048, cap // 4))


def serve(config: ServiceConfig, host: str, port: int, log_level: str = "info") -> None:
    """Run the service until interrupted (what `gravel serve` does)."""
    import uvicorn

    from gravel.service.app import create_app

    cap, backlog = connection_limits(config.max_connections)
    if cap < config.max_connections:
        log.warning("at most %d connections (the open-file limit leaves room for no more)", cap)
    protocol = type("ServiceProtocol", (GuardedH11Protocol,),
                    {"header_timeout_s": config.header_timeout_s, "max_connections": cap})
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, http=protocol, backlog=backlog,
                timeout_keep_alive=config.keep_alive_s, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
