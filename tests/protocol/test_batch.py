"""Batches of framed blobs: round trips, and every bad count, length or truncation named."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gravel.errors import BlobFormatError
from gravel.protocol import Kind, frame, is_batch, pack_batch, pack_parts, unframe, unpack_batch, unpack_parts
from gravel.protocol.batch import BATCH_MAGIC, MAX_BATCH, PARTS_MAGIC

DIGEST = bytes(range(32))


def _batch(count: int, *items: tuple[int, bytes], tail: bytes = b"") -> bytes:
    """A hand-made batch body: a header claiming `count` items, then (declared length, bytes)."""
    body = BATCH_MAGIC + struct.pack(">I", count)
    for size, data in items:
        body += struct.pack(">Q", size) + data
    return body + tail


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=20))
def test_round_trip(items):
    body = pack_batch(items)
    assert is_batch(body)
    assert unpack_batch(body) == items
    assert len(body) == 8 + sum(8 + len(i) for i in items)


def test_items_keep_their_own_frames():
    items = [frame(Kind.OUTPUT_CIPHERTEXT, DIGEST, bytes([i]) * (i + 1)) for i in range(3)]
    got = unpack_batch(pack_batch(items))
    assert [unframe(i, Kind.OUTPUT_CIPHERTEXT, DIGEST) for i in got] == [bytes([i]) * (i + 1) for i in range(3)]
    assert not is_batch(items[0])


def test_pack_refuses_empty_and_oversized_batches():
    with pytest.raises(ValueError, match="at least one item"):
        pack_batch([])
    with pytest.raises(ValueError, match=f"at most {MAX_BATCH} items, got {MAX_BATCH + 1}"):
        pack_batch([b"x"] * (MAX_BATCH + 1))
    assert len(unpack_batch(pack_batch([b"x"] * MAX_BATCH))) == MAX_BATCH


@pytest.mark.parametrize(("body", "message"), [
    (b"", "not a Gravel batch"),
    (b"GRVB\x00\x00\x00", "not a Gravel batch"),
    (b"GRVL" + b"\x00" * 40, "not a Gravel batch"),
    (_batch(0), "batch of 0 items; 1 to 4096 are allowed"),
    (_batch(MAX_BATCH + 1, (1, b"x")), f"batch of {MAX_BATCH + 1} items"),
    (_batch(2**32 - 1), f"batch of {2**32 - 1} items"),
    (_batch(2, (1, b"x")), "truncated before item 1 of 2"),
    (_batch(1, (1, b"x"))[:-2], "truncated before item 0 of 1"),
    (_batch(1, (0, b"")), "item 0 of 1 is truncated or empty"),
    (_batch(1, (5, b"abc")), "item 0 of 1 is truncated or empty"),
    (_batch(1, (2**64 - 1, b"abc")), "item 0 of 1 is truncated or empty"),
    (_batch(1, (3, b"abc"), tail=b"zz"), "2 stray bytes after 1 items"),
])
def test_bad_counts_and_lengths_are_named(body, message):
    with pytest.raises(BlobFormatError, match=f"^job input: {message}"):
        unpack_batch(body, "job input")


def test_every_truncation_is_a_format_error():
    body = pack_batch([b"first", b"second item", b"3"])
    for cut in range(len(body)):
        with pytest.raises(BlobFormatError):
            unpack_batch(body[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_hostile_bytes_get_a_format_error_or_round_trip(tail):
    body = BATCH_MAGIC + tail
    try:
        items = unpack_batch(body)
    except BlobFormatError:
        return
    assert pack_batch(items) == body


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=8))
def test_output_parts_round_trip(parts):
    """One part is the backend value itself (what every one-output program returns); several
    are a GRVP container that the client splits before decrypting each."""
    payload = pack_parts(parts)
    plain = len(parts) == 1 and not parts[0].startswith(PARTS_MAGIC)
    assert (payload == parts[0]) if plain else payload.startswith(PARTS_MAGIC)
    assert unpack_parts(payload) == parts


def test_a_single_value_that_starts_like_a_container_round_trips():
    # hypothesis found it in CI: [b"GRVP"] went out as is and came back as a truncated container
    for value in (PARTS_MAGIC, PARTS_MAGIC + b"\0\0\0\1rest"):
        assert unpack_parts(pack_parts([value])) == [value]


def test_damaged_output_parts_are_named():
    payload = pack_parts([b"abc", b"defg"])
    with pytest.raises(BlobFormatError, match="output ciphertext: item 1 of 2 is truncated"):
        unpack_parts(payload[:-1])
    with pytest.raises(BlobFormatError, match="stray bytes"):
        unpack_parts(payload + b"x")
    with pytest.raises(BlobFormatError, match="truncated parts header"):
        unpack_parts(PARTS_MAGIC + b"\0")
