"""A CKKS batch spread over real Ray workers equals the one-process result; a bad input is
still the client's fault (KeyMismatchError), not a cluster failure."""

import os

import numpy as np
import pytest

from gravel.errors import KeyMismatchError


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, digits):
    import ray

    from gravel.ckks.artifact import compile_ckks_model, load_client
    from gravel.ckks.compile import CkksOptions
    from gravel.cluster.ckks_executor import CkksRayExecutor
    from tests.ckks.conftest import train_digits_mlp

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    model = train_digits_mlp(digits, "square")
    m = compile_ckks_model(model, digits.x_train[:200], tmp_path_factory.mktemp("ckks") / "m.gravel",
                           options=CkksOptions(batch_block=64))
    client = load_client(m.root)
    client.keygen(("single", "batch"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    executor = CkksRayExecutor(m.root, workers=2)
    try:
        yield m, client, executor
    finally:
        executor.shutdown()
        ray.shutdown()


def test_a_batch_over_two_workers_equals_one_process(digits, cluster):
    from gravel.ckks.artifact import load_server

    m, client, executor = cluster
    keys = client.evaluation_keys()
    blob = client.encrypt(digits.x_test[:150])  # three groups of 64
    srv = load_server(m.root)
    alone = client.decrypt(srv.run(srv.load_keys(keys), blob))
    spread = client.decrypt(executor.run(keys, blob))
    assert spread.shape == (150, 10)
    np.testing.assert_allclose(spread, alone, atol=1e-3)
    one = client.decrypt(executor.run(keys, client.encrypt(digits.x_test[0])))
    np.testing.assert_allclose(one[0], alone[0], atol=1e-2)


def test_another_models_input_is_the_clients_fault(digits, cluster, tmp_path):
    from gravel.ckks.artifact import load_client

    m, client, executor = cluster
    other = load_client(m.root)
    other.keygen(("batch",))  # same model, other keys: ciphertexts of another context
    with pytest.raises(KeyMismatchError):
        executor.run(client.evaluation_keys(), other.encrypt(digits.x_test[:100]))


def test_one_images_first_matrix_split_among_workers(digits, cluster):
    """Partial products of the first matrix's diagonal blocks, added by the driver, give the
    whole product: the image decrypts as in one process."""
    from gravel.ckks.artifact import load_server
    from gravel.cluster.ckks_executor import CkksRayExecutor

    m, client, executor = cluster
    keys = client.evaluation_keys()
    srv = load_server(m.root)
    ctx = srv.load_keys(keys)
    blob = client.encrypt(digits.x_test[3])
    alone = client.decrypt(srv.run(ctx, blob))
    parts = [srv.single_part(ctx, blob, i, 2) for i in range(2)]
    np.testing.assert_allclose(client.decrypt(srv.single_finish(ctx, parts)), alone, atol=1e-2)
    executor.shutdown()
    split = CkksRayExecutor(m.root, workers=2, split_single=True)
    try:
        np.testing.assert_allclose(client.decrypt(split.run(keys, blob)), alone, atol=1e-2)
    finally:
        split.shutdown()
