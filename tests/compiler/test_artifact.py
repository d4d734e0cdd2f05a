import json
import shutil

import numpy as np

import pytest

from gravel.compiler import compile_model, load_graph
from gravel.errors import ArtifactError
from gravel.protocol import load_manifest


def test_artifact_layout_and_manifest(digits_artifact):
    names = sorted(p.name for p in digits_artifact.iterdir())
    assert names == ["client.specs.json", "manifest.json", "server.zip", "weights.npz"]
    m = load_manifest(digits_artifact, role="all")
    assert m.input["shape"] == [1, 8, 8] and m.input["bits"] == 2  # the QAT model's input quantizer
    # the output layer folded into the hidden layer's shards, whose partial outputs the client adds
    assert [r["shards"] for r in m.plan] == [4] and m.plan[0]["partial"]
    assert m.data["io"]["output_parts"] == ["stage0_0", "stage0_1", "stage0_2", "stage0_3"]
    assert m.data["stats"]["table_lookups"] == 16
    assert not any(p.suffix in (".pkl", ".pickle") for p in digits_artifact.iterdir())


def test_program_round_trips_through_artifact(digits, digits_artifact, digits_checkpoint):
    from gravel.compiler import QuantConfig, build
    from gravel.harness.common import calib_images

    # the settings the fixture compiled with (the default post-training search may choose others)
    fresh = build(digits_checkpoint, calib_images(digits, 200), QuantConfig(search=False)).qgraph
    loaded = load_graph(load_manifest(digits_artifact))
    assert (fresh.predict(digits.x_test) == loaded.predict(digits.x_test)).all()
    xq = fresh.quantize_input(digits.x_test[:50])
    assert np.array_equal(fresh.forward_int(xq), loaded.forward_int(xq))


def test_tampered_file_is_refused(tmp_path, digits_artifact):
    copy = tmp_path / "copy.gravel"
    shutil.copytree(digits_artifact, copy)
    with open(copy / "weights.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match="weights.npz does not match its hash"):
        load_manifest(copy, role="server")
    load_manifest(copy, role="client")  # the client does not need the server's files


def test_version_mismatch_is_refused(tmp_path, digits_artifact):
    copy = tmp_path / "v.gravel"
    shutil.copytree(digits_artifact, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["backend"]["concrete_python"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="compiled with concrete-python 0.0.1"):
        load_manifest(copy)
    with pytest.raises(ArtifactError, match="not a Gravel artifact"):
        load_manifest(tmp_path)


def test_existing_artifact_not_overwritten(digits, digits_artifact, digits_checkpoint):
    before = (digits_artifact / "manifest.json").read_bytes()
    with pytest.raises(ArtifactError, match="already exists"):
        compile_model(digits_checkpoint, digits.x_train[:50], digits_artifact)
    assert (digits_artifact / "manifest.json").read_bytes() == before


def test_compile_progress_is_not_compiled_into_the_program():
    """concrete's show_progress would compile trace messages into every function: each server
    run would print a progress bar to stdout. `gravel compile` reports its progress itself."""
    from gravel.compiler import QuantConfig, build, lower
    from tests.compiler.graphs import mlp

    rng = np.random.default_rng(0)
    x = rng.random((30, 64))
    compiled = build(mlp(rng, dict(fn="relu")), x, QuantConfig(search=False))
    module = lower(compiled, x, simulation=True, show_progress=True)
    assert "fused" in module.mlir and "Tracing.trace_message" not in module.mlir
