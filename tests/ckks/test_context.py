"""Key sets: public context without secret, only the rotations asked for, framed bytes refused
when they are not what they claim."""

import numpy as np
import pytest

from gravel.ckks import Evaluator, PublicContext, SecretContext, choose_params
from gravel.errors import BlobFormatError, KeyMismatchError
from gravel.protocol.framing import HEADER_SIZE, Kind, frame


@pytest.fixture(scope="module")
def small():
    return SecretContext.create(choose_params(1), rotation_steps=[1, 3, -2])


def test_public_context_has_no_secret_key(small):
    pub = small.public()
    assert small.has_secret_key() is True
    assert pub.has_secret_key() is False
    assert pub.tenseal.is_public()
    assert pub.digest == small.digest
    assert pub.params == small.params


def test_only_requested_rotations(small):
    pub = small.public()
    assert pub.rotation_steps == (1, -2, 3)
    assert pub.has_rotation(1) and pub.has_rotation(3) and pub.has_rotation(-2)
    assert not pub.has_rotation(2) and not pub.has_rotation(4)
    ev = Evaluator(pub)
    ct = ev.encrypt(np.arange(8.0))
    with pytest.raises(KeyMismatchError, match="rotation by 5 needs a Galois key"):
        ev.rotate(ct, 5)


def test_seeded_keys_are_smaller_than_tenseal_own():
    """Gravel's public context (seeded keys, power-of-two steps) vs TenSEAL's serialization of
    the same keys (expanded)."""
    ctx = SecretContext.create(choose_params(1))
    tctx = ctx.tenseal.copy()
    tctx.generate_galois_keys()
    theirs = len(tctx.serialize(save_secret_key=False))
    assert ctx.public_context_size() < 0.6 * theirs


def test_public_context_computes_and_owner_decrypts(small):
    pub = small.public()
    x = np.linspace(-1, 1, 16)
    ev_pub, ev_own = Evaluator(pub), Evaluator(small)
    ct = ev_own.encrypt(x)
    from gravel.ckks import Ciphertext

    remote = Ciphertext.from_bytes(pub, ct.to_bytes())
    out = ev_pub.rotate(ev_pub.mul(remote, remote), 1)
    back = Ciphertext.from_bytes(small, out.to_bytes())
    # N=4096, depth 1: the rotation's key switch costs a few bits there (see gravel.ckks.params)
    np.testing.assert_allclose(ev_own.decrypt(back)[:15], (x * x)[1:16], atol=1e-3)
    with pytest.raises(KeyMismatchError, match="needs the secret key"):
        ev_pub.decrypt(remote)


def test_hostile_context_bytes_refused(small):
    good = small.serialize_public()
    with pytest.raises(KeyMismatchError, match="missing header"):
        PublicContext.load(b"junk")
    with pytest.raises(BlobFormatError, match="damaged or truncated"):
        PublicContext.load(good[:-10])  # digest no longer matches the payload
    flipped = bytearray(good)
    flipped[HEADER_SIZE + 200] ^= 0xFF
    with pytest.raises(KeyMismatchError):
        PublicContext.load(bytes(flipped))
    with pytest.raises(KeyMismatchError, match="expected ckks public context, got ckks ciphertext"):
        import hashlib

        payload = good[HEADER_SIZE:]
        PublicContext.load(frame(Kind.CKKS_CIPHERTEXT, hashlib.sha256(payload).digest(), payload))


def test_a_secret_key_in_a_context_is_refused(small):
    """A TenSEAL context serialized WITH its secret key, framed as a public context: refused
    before TenSEAL loads it."""
    import hashlib
    import json
    import struct

    secret_proto = small.tenseal.serialize(save_secret_key=True, save_galois_keys=False)
    head = json.dumps({"format": 1, "params": small.params.to_json(), "rotation_steps": []}).encode()
    payload = struct.pack("<I", len(head)) + head + secret_proto
    blob = frame(Kind.CKKS_PUBLIC_CONTEXT, hashlib.sha256(payload).digest(), payload)
    with pytest.raises(KeyMismatchError, match="SECRET key"):
        PublicContext.load(blob)


def test_ciphertext_of_other_keys_refused(small):
    other = SecretContext.create(choose_params(1), rotation_steps=None)
    ct = Evaluator(other).encrypt([1.0, 2.0])
    from gravel.ckks import Ciphertext

    # same parameters, other keys: SEAL cannot tell, so Gravel checks by context identity
    foreign = Ciphertext.from_bytes(small, ct.to_bytes())
    with pytest.raises(KeyMismatchError, match="another CKKS context"):
        Evaluator(other).add(Evaluator(other).encrypt([1.0]), foreign)
    deeper = SecretContext.create(choose_params(2), rotation_steps=None)
    with pytest.raises(KeyMismatchError, match="SEAL refused"):
        Ciphertext.from_bytes(small, Evaluator(deeper).encrypt([1.0]).to_bytes())


def test_ciphertext_blob_round_trip_and_refusals(small):
    from gravel.ckks import dump_ciphertexts, load_ciphertexts
    from gravel.errors import InputError

    ev = Evaluator(small)
    cts = [ev.encrypt([1.0, 2.0]), ev.encrypt([3.0])]
    blob = dump_ciphertexts(small, cts, {"input": "x", "batch": 2}, extra=b"layout")
    pub = small.public()
    back, head, extra = load_ciphertexts(pub, blob)
    assert head == {"input": "x", "batch": 2} and extra == b"layout" and len(back) == 2
    np.testing.assert_allclose(ev.decrypt(Evaluator(pub).add(back[0], back[1]))[:2], [4.0, 2.0], atol=1e-3)
    with pytest.raises(InputError, match="the blob's own"):
        dump_ciphertexts(small, cts, {"ciphertexts": 1})
    with pytest.raises(KeyMismatchError, match="truncated or altered"):
        load_ciphertexts(pub, blob[:-3])
    other = SecretContext.create(choose_params(1), rotation_steps=None)
    with pytest.raises(KeyMismatchError, match="another CKKS context"):
        load_ciphertexts(other, blob)
