"""The CKKS artifact: the manifest conventions of TFHE's, hashed files, no pickle."""

import json

import numpy as np
import pytest

from gravel.ckks.artifact import load_client, load_program
from gravel.errors import ArtifactError
from gravel.protocol.manifest import load_manifest


def test_manifest_describes_backend_packing_and_files(sq_artifact):
    m = load_manifest(sq_artifact.root, role="all", backends=("ckks",))
    assert m.backend == "ckks" and m.data["backend"]["depth"] == 3
    assert set(m.data["files"]) == {"client.ckks.json", "weights.npz"}
    single = m.data["packing"]["single"]
    assert single["rotation_steps"] and m.data["packing"]["batch"]["block"] == 1024
    assert m.digest.hex() == m.data["files"]["client.ckks.json"]
    # the client needs only the manifest and its spec; the spec has no weights
    spec = json.loads((m.root / "client.ckks.json").read_text())
    assert "stages" not in spec and spec["single"]["rotation_steps"] == single["rotation_steps"]
    with np.load(m.root / "weights.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["s0_bias", "s0_weight", "s1_bias", "s1_weight"]
    assert load_client(m).n_out == 10


def test_altered_weights_are_refused(tmp_path, sq_artifact):
    import shutil

    copy = tmp_path / "copy.gravel"
    shutil.copytree(sq_artifact.root, copy)
    load_program(copy)
    with np.load(copy / "weights.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["s0_weight"][0, 0] += 1.0
    np.savez(copy / "weights.npz", **arrays)
    with pytest.raises(ArtifactError, match="does not match its hash"):
        load_program(copy)
    load_manifest(copy, role="client", backends=("ckks",))  # the client's files are intact


def test_existing_artifact_is_kept_without_overwrite(digits, sq_model, sq_artifact):
    from gravel.ckks.artifact import compile_ckks_model

    before = (sq_artifact.root / "manifest.json").read_text()
    with pytest.raises(ArtifactError, match="already exists"):
        compile_ckks_model(sq_model, digits.x_train[:50], sq_artifact.root)
    assert (sq_artifact.root / "manifest.json").read_text() == before


def test_tfhe_readers_refuse_a_ckks_artifact_by_name(sq_artifact):
    with pytest.raises(ArtifactError, match="a ckks artifact; this part of Gravel reads concrete"):
        load_manifest(sq_artifact.root, role="server")
