"""The blob header: every mismatch named, damage told apart from another model's bytes, and
hostile bytes never escaping as anything but Gravel's errors. No crypto needed."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gravel.errors import BlobFormatError, KeyMismatchError
from gravel.protocol import Kind, frame, unframe
from gravel.protocol.framing import HEADER_SIZE

DIGEST = hashlib.sha256(b"a compiled program").digest()
OTHER = hashlib.sha256(b"another program").digest()
PAYLOAD = b"backend bytes \x00\x01\xff" * 4


def _raises_mismatch_only(data: bytes, kind: Kind, match: str) -> None:
    """A well-formed blob of another kind or model: KeyMismatchError, and not a format error."""
    with pytest.raises(KeyMismatchError, match=match) as err:
        unframe(data, kind, DIGEST, "upload")
    assert not isinstance(err.value, BlobFormatError)


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_for_every_kind(kind):
    blob = frame(kind, DIGEST, PAYLOAD)
    assert len(blob) == HEADER_SIZE + len(PAYLOAD)
    assert blob[:4] == b"GRVL" and blob[4] == 1 and blob[5] == int(kind) and blob[6:HEADER_SIZE] == DIGEST
    assert unframe(blob, kind, DIGEST) == PAYLOAD


@pytest.mark.parametrize("digest", [b"", b"\x00" * 31, b"\x00" * 33, DIGEST.hex().encode()])
def test_frame_needs_a_sha256_digest(digest):
    with pytest.raises(ValueError, match="32 bytes"):
        frame(Kind.INPUT_CIPHERTEXT, digest, PAYLOAD)


@pytest.mark.parametrize("data", [b"", b"GRV", b"GRVL", b"\x00" * HEADER_SIZE, b"GRVX" + b"\x00" * 60,
                                  b"PK\x03\x04" + b"\x00" * 60, b"hello" * 100])
def test_missing_or_foreign_header_is_a_format_error(data):
    with pytest.raises(BlobFormatError, match=r"upload: not a Gravel input ciphertext blob \(missing header"):
        unframe(data, Kind.INPUT_CIPHERTEXT, DIGEST, "upload")


def test_every_truncation_inside_the_header_is_a_format_error():
    blob = frame(Kind.EVALUATION_KEYS, DIGEST, PAYLOAD)
    for cut in range(HEADER_SIZE + 1):
        with pytest.raises(BlobFormatError, match="missing header|empty body"):
            unframe(blob[:cut], Kind.EVALUATION_KEYS, DIGEST)
    # Framing cannot see a payload cut short; the backend's deserializer must (parse_blob does).
    assert unframe(blob[:-3], Kind.EVALUATION_KEYS, DIGEST) == PAYLOAD[:-3]


@pytest.mark.parametrize("version", [0, 2, 255])
def test_another_framing_version_is_a_format_error(version):
    blob = bytearray(frame(Kind.INPUT_CIPHERTEXT, DIGEST, PAYLOAD))
    blob[4] = version
    with pytest.raises(BlobFormatError, match=f"framing version {version}, this Gravel reads version 1"):
        unframe(bytes(blob), Kind.INPUT_CIPHERTEXT, DIGEST)


@pytest.mark.parametrize("code", [0, max(Kind) + 1, 77, 255])  # max + 1: the first kind not yet defined
def test_an_unknown_kind_is_a_format_error(code):
    blob = bytearray(frame(Kind.INPUT_CIPHERTEXT, DIGEST, PAYLOAD))
    blob[5] = code
    with pytest.raises(BlobFormatError, match=f"unknown blob kind {code}"):
        unframe(bytes(blob), Kind.INPUT_CIPHERTEXT, DIGEST)


@pytest.mark.parametrize("found", list(Kind))
@pytest.mark.parametrize("wanted", list(Kind))
def test_another_kind_is_a_mismatch_named_both_ways(wanted, found):
    if wanted == found:
        return
    _raises_mismatch_only(frame(found, DIGEST, PAYLOAD), wanted, f"expected {wanted.label}, got {found.label}")


def test_a_secret_key_sent_as_evaluation_keys_says_what_to_send():
    _raises_mismatch_only(frame(Kind.SECRET_KEYS, DIGEST, PAYLOAD), Kind.EVALUATION_KEYS,
                          r"SECRET key set must never be sent.*evaluation_keys\(\)")


def test_another_model_is_a_mismatch_naming_both_programs():
    _raises_mismatch_only(frame(Kind.OUTPUT_CIPHERTEXT, OTHER, PAYLOAD), Kind.OUTPUT_CIPHERTEXT,
                          f"made for another model \\(program {OTHER[:8].hex()}.*this artifact is {DIGEST[:8].hex()}")


def test_an_empty_payload_is_a_format_error():
    with pytest.raises(BlobFormatError, match="evaluation keys has an empty body"):
        unframe(frame(Kind.EVALUATION_KEYS, DIGEST, b""), Kind.EVALUATION_KEYS, DIGEST)


_header = st.builds(
    lambda magic, version, kind, digest: magic + bytes([version, kind]) + digest,
    st.sampled_from([b"GRVL", b"GRVB", b"\x00\x00\x00\x00"]), st.sampled_from([0, 1, 2]),
    st.integers(0, 255), st.sampled_from([DIGEST, OTHER, bytes(32)]),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.builds(bytes.__add__, _header, st.binary(max_size=16))))
def test_hostile_bytes_get_gravel_errors_or_round_trip(data):
    for kind in Kind:
        try:
            payload = unframe(data, kind, DIGEST)
        except KeyMismatchError as exc:
            assert str(exc).startswith("input: ")
            continue
        assert payload and frame(kind, DIGEST, payload) == data
