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
    # the output layer folded into the hidden layer's 4 shards: one stage, 4 partial outputs
    assert [t.stage for t in trace] == ["stage0"] and trace[0].shards == 4 and len(chain) == 4
    # (fused and chain agree exactly on exactly-rounded artifacts: the tests below; this one's
    # approximate rounding at p_error 0.01 may move a near tie)
    assert client.decrypt(keys, server.frame_output(chain)).shape == (10,)


def test_partial_outputs_of_a_folded_output_layer_add_up_to_the_clear_output(tmp_path, digits, digits_checkpoint):
    """A plan for 2 workers folds the output Gemm into the hidden layer's two shards: each
    returns its part, the client adds them, and the sum is exactly the clear program's output,
    as is the fused function's single output."""
    from gravel.client import ClientModel
    from gravel.compiler import QuantConfig, compile_model
    from gravel.harness.common import calib_images

    art = tmp_path / "folded.gravel"
    manifest = compile_model(digits_checkpoint, calib_images(digits, 200), art,
                             QuantConfig(rounding="exact", search=False), p_error=1e-5, max_shards=2)
    assert [row["shards"] for row in manifest.plan] == [2] and manifest.plan[-1]["partial"]
    assert manifest.output_functions(2) == ["stage0_0", "stage0_1"] and manifest.output_functions(1) == ["fused"]
    client = ClientModel.load(art)
    keys = client.keygen()
    server = ServerModel.load(art)
    ek = server.load_evaluation_keys(keys.evaluation_keys())
    graph = load_graph(manifest)
    x = digits.x_test[:3]
    clear = graph.dequantize_output(graph.forward_int(graph.quantize_input(x)))
    for image, expected in zip(x, clear):
        value = server.load_input(client.encrypt(keys, image))
        parts, _ = server.run(ek, value, whole=False)
        fused, _ = server.run(ek, value)
        np.testing.assert_allclose(client.decrypt(keys, server.frame_output(parts)), expected)
        np.testing.assert_allclose(client.decrypt(keys, server.frame_output(fused)), expected)
    with pytest.raises(KeyMismatchError, match="has 3 parts; this model's outputs have 1 or 2"):
        client.decrypt(keys, server.frame_output([parts[0], parts[1], parts[0]]))


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


def test_row_tiles_with_a_halo_decrypt_to_the_clear_output(tmp_path, digits):
    """Real encryption of a plan whose three convolutional stages run as one call per shard
    in two row tiles (compile --tiles): the tiles' functions, run one after another as two
    workers would, decrypt to exactly the clear program's output (simulated in test_tiles)."""
    from gravel.client import ClientModel
    from gravel.compiler import QuantConfig, compile_model
    from gravel.harness.common import calib_images
    from tests.compiler.graphs import residual_cnn

    art = tmp_path / "tiled.gravel"
    x = calib_images(digits, 100).reshape(-1, 1, 8, 8)
    manifest = compile_model(residual_cnn(np.random.default_rng(6), c=2), x, art,
                             QuantConfig(rounding="exact", search=False), p_error=1e-5, max_shards=2, tiles=True)
    assert [(row["shards"], row["axis"]) for row in manifest.plan] == [(2, 1), (1, 0)]
    client = ClientModel.load(art)
    keys = client.keygen()
    server = ServerModel.load(art)
    ek = server.load_evaluation_keys(keys.evaluation_keys())
    graph = load_graph(manifest)
    image = digits.x_test[:1].reshape(1, 1, 8, 8)
    expected = graph.dequantize_output(graph.forward_int(graph.quantize_input(image)))[0]
    value = server.load_input(client.encrypt(keys, image[0]))
    chain, trace = server.run(ek, value, whole=False)
    assert [(t.stage, t.shards) for t in trace] == [("stage0", 2), ("stage1", 1)]
    np.testing.assert_allclose(client.decrypt(keys, server.frame_output(chain)), expected)
