"""Shared fixtures: a small digits model compiled once per session (real concrete compile)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


@pytest.fixture(scope="session")
def digits():
    from gravel.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_model(digits):
    """A QAT MLP 64-16-10 on the 8x8 digits: small enough to encrypt in a test.

    The same model in every run: its initial weights are seeded (they came from whatever the
    tests before had drawn) and it trains on one thread (CPU training on several threads is not
    bit-reproducible). Several tests expect its 4-shard artifact to carry a fused function, which
    concrete does not give every trained model (the encodings it picks may differ); one fresh
    clone's suite got such a model and failed four tests."""
    import torch

    from gravel.model import build_model, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, options = build_model("mlp", digits.image_shape, 10, hidden=[16])
        metrics = train(model, digits, epochs=40, lr=1e-2, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, options, metrics


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory, digits, digits_model):
    from gravel.model import Checkpoint, save_checkpoint

    model, options, metrics = digits_model
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    save_checkpoint(Checkpoint("mlp", options, digits.image_shape, 10, "digits", model, metrics), path)
    return path


@pytest.fixture(scope="session")
def digits_artifact(tmp_path_factory, digits, digits_checkpoint):
    from gravel.compiler import QuantConfig, compile_model
    from gravel.harness.common import calib_images

    out = tmp_path_factory.mktemp("art") / "digits.gravel"
    compile_model(digits_checkpoint, calib_images(digits, 200), out, QuantConfig(search=False), max_shards=4)
    return out


@pytest.fixture(scope="session")
def service_artifact(tmp_path_factory, digits, digits_checkpoint):
    """The digits model with one shard per stage (and so a fused whole-network function):
    what one process runs fastest; the service tests use it."""
    from gravel.compiler import QuantConfig, compile_model
    from gravel.harness.common import calib_images

    # Exact rounding and a low error probability: the service tests compare every encrypted
    # prediction with the clear model's, and approximate rounding flips ~1 prediction in 80.
    out = tmp_path_factory.mktemp("svc-art") / "digits.gravel"
    compile_model(digits_checkpoint, calib_images(digits, 200), out, QuantConfig(rounding="exact", search=False),
                  p_error=1e-4, max_shards=1)
    return out


@pytest.fixture(scope="session")
def client_keys(digits_artifact):
    from gravel.client import ClientModel

    client = ClientModel.load(digits_artifact)
    return client, client.keygen()


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


# Test files that start a Ray instance run apart from the others, one after another, in a plain
# pytest process (scripts/test.sh): two embedded Rays on one small machine at once starve each
# other (lost objects, timeouts), and a pytest-xdist worker that drove Ray and concrete died
# mid-run. Every other file is an xdist group of its own, so its module fixtures are built once.
RAY_FILES = {
    "tests/cluster/test_executor.py", "tests/cli/test_cli.py", "tests/harness/test_scaling.py",
    "tests/harness/test_demo.py", "tests/service/test_sdk_cli.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: the test starts Ray (scripts/test.sh runs these in one plain process)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::")[0]
        if path in RAY_FILES:
            item.add_marker(pytest.mark.ray)
        item.add_marker(pytest.mark.xdist_group("ray" if path in RAY_FILES else path))


# concrete-python's runtime, once it has run in this process, makes the interpreter exit with
# status 0 from its own teardown, whatever pytest decided: a failing suite would look green.
# Leave with pytest's exit status after every plugin has finished.
_EXIT_STATUS = {"code": 0}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS["code"])
