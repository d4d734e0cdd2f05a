"""Request bodies, streamed: into a temporary blob file chunk by chunk, never whole in memory.

A body is refused as early as it can be: on its declared length before a byte is read, on its
first bytes (the Gravel frame header) before the rest is, once it passes its limit, and when it
pauses longer than the body timeout (so a slow sender cannot hold the connection and a key-load
slot indefinitely).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from gravel.service.api_errors import ApiError
from gravel.service.store import BlobWriter, Store, TooLarge

__all__ = ["check_type", "declared_length", "receive_body"]

HeadCheck = Callable[[bytes], None]


def check_type(request: Request, *allowed: str) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in allowed:
        raise ApiError(415, f"content type {ctype or 'none'!r}: this endpoint takes {' or '.join(allowed)}")


def declared_length(request: Request, limit: int, what: str) -> int | None:
    """The Content-Length, refused (413) when it is over `limit`; None for a chunked body."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise ApiError(400, "Content-Length is not a number")
    if int(declared) > limit:
        raise ApiError(413, f"{what}: {declared} bytes is over this server's limit of {limit}")
    return int(declared)


async def receive_body(
    request: Request,
    store: Store,
    limit: int,
    what: str,
    idle_timeout_s: float,
    head: tuple[int, HeadCheck] | None = None,
    limit_reason: str | None = None,
) -> BlobWriter:
    """Stream the body into a temporary blob file; the caller adopts it into the store or
    discards it. `head=(n, check)` calls `check(first n bytes)` as soon as they have arrived,
    before anything else is read; `check` raises ApiError to refuse the body. `limit_reason`
    says why `limit` is what it is, for the 413 message."""
    declared_length(request, limit, what)
    writer = await run_in_threadpool(store.writer, limit)
    need, check = head if head is not None else (0, None)
    first = bytearray()
    try:
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), idle_timeout_s or None)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(408, f"{what}: no data for {idle_timeout_s:g} s; send the body without pauses") from None
            if check is not None and len(first) < need:
                first += chunk[: need - len(first)]
                if len(first) >= need:
                    check(bytes(first))
            writer.write(chunk)
        if writer.size == 0:
            raise ApiError(400, f"{what}: empty body")
        if check is not None and len(first) < need:
            check(bytes(first))  # too short to hold a header: let the check name the problem
        await run_in_threadpool(writer.finish)
    except TooLarge:
        writer.discard()
        reason = limit_reason or f"this server's limit of {limit} bytes"
        raise ApiError(413, f"{what}: larger than {reason}") from None
    except ClientDisconnect:
        writer.discard()
        raise ApiError(400, f"{what}: the client went away before the body was complete") from None
    except BaseException:
        writer.discard()
        raise
    return writer
