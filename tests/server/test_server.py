"""Real encryption, execution and decryption (no simulation) on the digits model."""


import numpy as np
import pytest

from gravel.compiler import load_graph
from gravel.errors import KeyMismatchError
from gravel.protocol import Kind, frame, load_manifest
from gravel.server import ServerModel


@pytest.fixture(scope="module")
def server(digits_artifact):
    return ServerModel.load(digits_artifact)


def test_encrypt_run_decrypt(client_keys, server, digits, digits_artifact):
    """The whole round trip on real ciphertexts (how fast is for benchmarks, not this test)."""
    client, keys = client_keys
    graph = load_graph(load_manifest(digits_artifact))
    ek = keys.evaluation_keys()
    ct = client.encrypt(keys, digits.x_test[0])
    out, trace = server.run_bytes(ek, ct)
    pred = client.predict(keys, out)
    assert pred == graph.predict(digits.x_test[:1])[0]
    assert [t.stage for t in trace] == ["fused"]  # one process: the whole network in one call
    # the sharded plan's stage chain (what Ray workers run), here one shard after another
    server_keys = server.load_evaluation_keys(ek)
    chain, trace = server.run(server_keys, server.load_input(ct), whole=False)
    assert [t.stage for t in trace] == ["stage0", "stage1"] and trace[0].shards == 4
    # (fused and chain agree exactly on the exactly-rounded service artifact: the fused test below;
    # this one's approximate rounding at p_error 0.01 may move a near tie)
    assert client.decrypt(keys, server.frame_output(chain)).shape == (10,)


def test_several_images_agree_with_clear_model(client_keys, server, digits, digits_artifact):
    client, keys = client_keys
    graph = load_graph(load_manifest(digits_artifact))
    server_keys = server.load_evaluation_keys(keys.evaluation_keys())
    x = digits.x_test[:6]
    preds = []
    for image in x:
        out, _ = server.run(server_keys, server.load_input(client.encrypt(keys, image)))
        preds.append(client.predict(keys, server.frame_output(out)))
    assert (np.asarray(preds) == graph.predict(x)).mean() >= 5 / 6


def test_server_refuses_secret_keys_and_foreign_blobs(client_keys, server, tmp_path):
    client, keys = client_keys
    keys.save(tmp_path / "s.key")
    with pytest.raises(KeyMismatchError, match="expected evaluation keys, got secret keys"):
        server.load_evaluation_keys((tmp_path / "s.key").read_bytes())
    with pytest.raises(KeyMismatchError, match="made for another model"):
        server.load_evaluation_keys(frame(Kind.EVALUATION_KEYS, b"\x02" * 32, b"abc"))
    with pytest.raises(KeyMismatchError, match="missing header"):
        server.load_input(b"")


@pytest.mark.parametrize("cut", [10, 1000])
def test_truncated_or_garbage_payloads_get_clear_errors(client_keys, server, digits, cut):
    client, keys = client_keys
    ek = keys.evaluation_keys()
    ct = client.encrypt(keys, digits.x_test[0])
    with pytest.raises(KeyMismatchError, match="corrupt or truncated"):
        server.load_evaluation_keys(ek[: 38 + cut])
    with pytest.raises(KeyMismatchError, match="corrupt or truncated"):
        server.load_input(ct[: 38 + cut] if cut < len(ct) - 38 else ct[:-5])
    garbage = frame(Kind.INPUT_CIPHERTEXT, client.digest, np.random.default_rng(cut).bytes(cut))
    with pytest.raises(KeyMismatchError):
        server.load_input(garbage)


def test_fused_function_reads_and_writes_the_stage_chain_ciphertexts(service_artifact, digits_artifact, digits):
    from gravel.client import ClientModel

    assert load_manifest(digits_artifact).data["fused"] == {"function": "fused"}  # sharded plans too
    assert load_manifest(service_artifact).data["fused"] == {"function": "fused"}
    client = ClientModel.load(service_artifact)
    keys = client.keygen()
    server = ServerModel.load(service_artifact)
    ek = server.load_evaluation_keys(keys.evaluation_keys())
    clear = load_graph(load_manifest(service_artifact)).predict(digits.x_test[:3])
    for image, expected in zip(digits.x_test[:3], clear):
        value = server.load_input(client.encrypt(keys, image))
        fused, fused_trace = server.run(ek, value)
        assert [t.stage for t in fused_trace] == ["fused"]
        chain = ServerModel.load(service_artifact)
        chain.fused = None
        out, chain_trace = chain.run(ek, value)
        assert len(chain_trace) == len(chain.manifest.plan) > 1
        assert client.predict(keys, server.frame_output(fused)) == client.predict(keys, chain.frame_output(out)) == expected
