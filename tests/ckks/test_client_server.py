"""The private path through real bytes: keys made by the client, evaluation by a server that
holds only the public context, decryption equal to the float model within CKKS noise."""

import numpy as np
import pytest

from gravel.ckks.artifact import compile_ckks_model, load_server
from gravel.ckks.blob import dump_ciphertexts
from gravel.errors import KeyMismatchError
from gravel.protocol.framing import Kind, frame

TOL = 1e-2  # logits are O(10); CKKS at 11 bits of precision after three levels


@pytest.fixture(scope="module")
def server(sq_artifact, sq_keys):
    srv = load_server(sq_artifact.root)
    return srv, srv.load_keys(sq_keys[1])


def test_server_context_has_no_secret_key(server, sq_keys):
    _, ctx = server
    assert ctx.has_secret_key() is False and sq_keys[0].context.has_secret_key() is True


def test_one_image_matches_the_float_model(digits, server, sq_keys, sq_float_logits):
    srv, ctx = server
    client = sq_keys[0]
    for i in range(2):
        reply = srv.run(ctx, client.encrypt(digits.x_test[i]))
        np.testing.assert_allclose(client.decrypt(reply)[0], sq_float_logits[i], atol=TOL)


def test_a_batch_matches_the_float_model(digits, server, sq_keys, sq_float_logits):
    srv, ctx = server
    client = sq_keys[0]
    blob = client.encrypt(digits.x_test[:64])
    logits = client.decrypt(srv.run(ctx, blob))
    assert logits.shape == (64, 10)
    np.testing.assert_allclose(logits, sq_float_logits, atol=TOL)
    assert (logits.argmax(1) == sq_float_logits.argmax(1)).all()


def test_keys_of_another_model_are_refused(tmp_path, digits, relu_model, sq_keys):
    other = compile_ckks_model(relu_model, digits.x_train[:100], tmp_path / "relu.gravel")
    with pytest.raises(KeyMismatchError, match="another model"):
        load_server(other.root).load_keys(sq_keys[1])


def test_keys_missing_rotations_are_refused(sq_artifact):
    from gravel.ckks.artifact import load_client

    client = load_client(sq_artifact.root)
    client.keygen(("batch",))
    srv = load_server(sq_artifact.root)
    srv.load_keys(client.evaluation_keys(), ("batch",))
    with pytest.raises(KeyMismatchError, match="lack the rotation steps"):
        srv.load_keys(client.evaluation_keys(), ("single",))


def test_a_ciphertext_at_the_wrong_level_is_refused(digits, server, sq_keys):
    srv, ctx = server
    client = sq_keys[0]
    ev = client._ev
    low = ev.encrypt(np.zeros(64), level=ctx.top_level - 1)
    body = dump_ciphertexts(client.context, [low], {"mode": "single", "n": 1})
    with pytest.raises(KeyMismatchError, match="fresh inputs are at level"):
        srv.run(ctx, frame(Kind.INPUT_CIPHERTEXT, srv.digest, body))


def test_a_batch_larger_than_one_group(tmp_path, digits, sq_model, sq_float_logits):
    """128 samples per SIMD group: 150 images are two groups, 32 blocks per ciphertext, and
    the block offsets compose from power-of-two rotation keys."""
    from gravel.ckks.artifact import load_client
    from gravel.ckks.compile import CkksOptions

    m = compile_ckks_model(sq_model, digits.x_train[:200], tmp_path / "b.gravel",
                           options=CkksOptions(batch_block=128))
    assert m.data["packing"]["batch"]["block"] == 128
    client = load_client(m.root)
    client.keygen(("batch",))
    srv = load_server(m.root)
    ctx = srv.load_keys(client.evaluation_keys(), ("batch",))
    logits = client.decrypt(srv.run(ctx, client.encrypt(digits.x_test[:150])))
    import torch

    with torch.no_grad():
        ref = sq_model(torch.tensor(digits.x_test[:150])).numpy()
    np.testing.assert_allclose(logits[:64], sq_float_logits, atol=TOL)
    np.testing.assert_allclose(logits, ref, atol=TOL)


def test_hostile_bytes_are_refused_by_name(digits, server, sq_keys):
    from gravel.errors import BlobFormatError

    srv, ctx = server
    client, keys = sq_keys
    with pytest.raises(BlobFormatError):
        srv.load_keys(b"\x00" * 200)
    with pytest.raises(BlobFormatError, match="damaged or truncated"):
        srv.load_keys(keys[:-100])
    blob = client.encrypt(digits.x_test[0])
    with pytest.raises(KeyMismatchError, match="expected input ciphertext, got evaluation keys"):
        srv.run(ctx, keys)
    with pytest.raises(KeyMismatchError):
        srv.run(ctx, blob[:-10])
    with pytest.raises(KeyMismatchError, match="expected output ciphertext"):
        client.decrypt(blob)


def test_first_matrix_on_shifted_replicas():
    """A 256 -> 32 -> 10 program: the client rotates each replica of the image, so the first
    matrix needs 2 * shift diagonals; the answer is still the plain product."""
    from gravel.ckks.client import CkksClient
    from gravel.ckks.compile import CkksOptions, plan_program
    from gravel.ckks.program import CkksProgram, Stage
    from gravel.ckks.server import CkksServer

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.1, (32, 256)), rng.normal(0, 0.3, (10, 32))
    prog = CkksProgram((256,), [Stage(w1, rng.normal(0, 0.1, 32), (0.0, 0.5, 1.0)),
                                Stage(w2, rng.normal(0, 0.1, 10))])
    plan_program(prog, CkksOptions(), max_abs_output=8.0)
    assert prog.single_kind == "replicated" and prog.single_shift >= 2
    digest = bytes(32)
    client, srv = CkksClient(prog.client_json(), digest), CkksServer(prog, digest)
    client.keygen(("single",))
    ctx = srv.load_keys(client.evaluation_keys(), ("single",))
    x = rng.uniform(0, 1, (1, 256))
    got = client.decrypt(srv.run(ctx, client.encrypt(x)))
    np.testing.assert_allclose(got, prog.simulate(x), atol=TOL)
