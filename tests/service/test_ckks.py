"""A CKKS model through the real service and SDK: deploy, sessions, single and batch inference,
and the bad inputs of issue 12 (keys of another model or missing rotations, ciphertexts of
another model, key set, level or scale), each a 4xx naming the problem, nothing stored lost."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile

import httpx
import numpy as np
import pytest

from gravel.client import AsyncClient, Client
from gravel.protocol import Kind, frame

from .conftest import ADMIN, OCTETS, open_session


@pytest.fixture(scope="module")
def program(ckks_artifact):
    from gravel.ckks.artifact import load_program

    return load_program(ckks_artifact[0])


@pytest.fixture(scope="module")
def sdk(ckks_server, ckks_deployed, tmp_path_factory):
    """One SDK session (keys for both packings), its client kept open for the module."""
    client = Client(ckks_server.url, cache_dir=tmp_path_factory.mktemp("ckks-cache"))
    session = client.session("sq")
    yield client, session
    client.close()


def _post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + path, content=body, headers={"Content-Type": OCTETS, **(headers or {})}, timeout=120)


def test_model_info_and_the_clients_files(ckks_server, ckks_deployed, ckks_artifact):
    info = httpx.get(f"{ckks_server.url}/v1/models/sq").json()
    assert info["backend"].startswith("ckks ") and info["depth"] == 3 and info["packings"] == ["single", "batch"]
    assert info["digest"] == ckks_artifact[0].digest.hex() and info["input_shape"] == [1, 8, 8]
    assert info["keys_bytes"] > 1e6 and info["pbs_count"] is None
    spec = httpx.get(f"{ckks_server.url}/v1/models/sq/client-spec")
    assert spec.json()["format"] == "gravel-ckks-client"
    assert spec.content == ckks_artifact[0].path("client.ckks.json").read_bytes()
    # deploying the same artifact again is a no-op
    with Client(ckks_server.url, token=ADMIN) as c:
        assert c.deploy(ckks_artifact[0].root)["digest"] == info["digest"]


def test_sdk_single_and_batch_match_the_clear_program(sdk, program, digits):
    _, session = sdk
    x = digits.x_test[:12]
    clear = program.simulate(x)
    scores = session.scores(x[0])
    assert scores.shape == (10,) and np.max(np.abs(scores - clear[0])) < 1e-2
    assert session.predict(x[1]) == int(clear[1].argmax())
    assert session.predict_many(x[:5]) == [int(v) for v in clear[:5].argmax(1)]  # one SIMD input, /infer
    assert session.predict_batch(x) == [int(v) for v in clear.argmax(1)]  # one SIMD input, as a job
    job = session.submit(x[:3])
    out = session.result(job)
    assert len(out) == 3 and np.max(np.abs(np.stack(out) - clear[:3])) < 1e-2


def test_a_returning_client_reuses_its_saved_keys_and_session(sdk, ckks_server, program, digits):
    client, first = sdk
    with Client(ckks_server.url, cache_dir=client.cache_dir) as again:
        second = again.session("sq")
        assert second.id == first.id  # keys loaded from the cache (0600), nothing uploaded
        assert second.predict(digits.x_test[20]) == int(program.simulate(digits.x_test[20:21])[0].argmax())
    (secret,) = client.cache_dir.rglob("secret.keys")
    assert secret.stat().st_mode & 0o777 == 0o600


def test_async_sdk(ckks_server, ckks_deployed, program, digits, tmp_path):
    async def main():
        async with AsyncClient(ckks_server.url, cache_dir=tmp_path) as client:
            session = await client.session("sq")
            single = await session.predict(digits.x_test[30])
            batch = await session.predict_batch(digits.x_test[31:35])
            await session.close()
            return [single, *batch]

    assert asyncio.run(main()) == [int(v) for v in program.simulate(digits.x_test[30:35]).argmax(1)]


def test_bad_keys_are_refused_by_name(ckks_server, ckks_deployed, ckks_artifact, sdk):
    from gravel.ckks import SecretContext
    from gravel.ckks.params import choose_params
    from gravel.client.ckks_model import CkksClientModel

    url, manifest = ckks_server.url, ckks_artifact[0]
    client = CkksClientModel(manifest)._fresh_client()
    digest = manifest.digest
    sessions_before = len(list((ckks_server.data_dir / "blobs").rglob("*")))

    def refused(body: bytes, *words: str, status: int = 400) -> None:
        r = _post(url, "/v1/models/sq/sessions", body)
        assert r.status_code == status, r.text
        assert all(w in r.json()["detail"] for w in words), r.json()["detail"]

    # rotations missing: keys with one rotation step short of each packing
    steps = client.single_steps[:-1] + client.batch_steps[:-1]
    short = SecretContext.create(client.params, steps)
    refused(frame(Kind.EVALUATION_KEYS, digest, short.serialize_public()), "lack", "rotation steps",
            "single", "batch")
    # another model's keys (another digest in the frame)
    other = CkksClientModel(ckks_artifact[1]).keygen().evaluation_keys()
    refused(other, "made for another model")
    # this model's frame around keys of other parameters
    params = choose_params(2)
    refused(frame(Kind.EVALUATION_KEYS, digest, SecretContext.create(params, None).serialize_public()),
            "parameters", "make the keys from this model's artifact")
    # a secret key sent as evaluation keys
    _, session = sdk
    refused(frame(Kind.SECRET_KEYS, digest, b"x" * 64), "SECRET key")
    # garbage behind a valid header, and keys over the model's bound
    refused(frame(Kind.EVALUATION_KEYS, digest, b"\0" * 4096), "evaluation keys")
    refused(frame(Kind.EVALUATION_KEYS, digest, b"\0" * (ckks_deployed["keys_bytes"] + 10)), "at most",
            status=413)
    # nothing was stored by the refused uploads, and the session still works
    assert len(list((ckks_server.data_dir / "blobs").rglob("*"))) == sessions_before
    assert session.predict_many(np.zeros((2, 1, 8, 8))) is not None


def test_keys_for_one_packing_open_a_session_that_refuses_the_other(ckks_server, ckks_deployed, ckks_artifact,
                                                                    digits):
    from gravel.client.ckks_model import CkksClientModel

    model = CkksClientModel(ckks_artifact[0])
    keys = model.keygen(modes=("single",))
    sid, headers = open_session(ckks_server.url, "sq", keys.evaluation_keys())
    r = _post(ckks_server.url, f"/v1/sessions/{sid}/infer", model.encrypt(keys, digits.x_test[0]), headers)
    assert r.status_code == 200 and model.predict(keys, r.content) in range(10)
    # a batch input under these very keys (the SDK refuses to make one: forged here)
    from gravel.ckks.blob import dump_ciphertexts
    from gravel.ckks.evaluator import Evaluator

    ev = Evaluator(keys.context)
    cts = [ev.encrypt(np.zeros(keys.context.slots)) for _ in range(4)]  # 64 features, 16 per ciphertext
    batch_input = frame(Kind.INPUT_CIPHERTEXT, model.digest,
                        dump_ciphertexts(keys.context, cts, {"mode": "batch", "n": 3}))
    for path in ("/infer", "/jobs"):  # refused when submitted: no job is made
        r = _post(ckks_server.url, f"/v1/sessions/{sid}{path}", batch_input, headers)
        assert r.status_code == 400, r.text
        assert "lack the rotation steps" in r.json()["detail"] and "batch" in r.json()["detail"], r.text
    other = model.encrypt_batch(model.keygen(modes=("batch",)), digits.x_test[:3])
    r = _post(ckks_server.url, f"/v1/sessions/{sid}/jobs", other, headers)
    assert r.status_code == 400 and "another CKKS context" in r.json()["detail"], r.text


def test_bad_inputs_are_4xx_and_nothing_stored_is_lost(ckks_server, sdk, ckks_artifact, digits, program):
    from gravel.ckks.blob import dump_ciphertexts
    from gravel.ckks.ciphertext import Ciphertext
    from gravel.ckks.evaluator import Evaluator
    from gravel.client.ckks_model import CkksClientModel

    client, session = sdk
    url, sid = ckks_server.url, session.id
    headers = {"Authorization": f"Bearer {session.token}"}
    ctx = session.keys.context
    ev = Evaluator(ctx)
    digest = ckks_artifact[0].digest
    good = session.encrypt(digits.x_test[0])

    def forged(cts, mode="single", n=1) -> bytes:
        return frame(Kind.INPUT_CIPHERTEXT, digest, dump_ciphertexts(ctx, cts, {"mode": mode, "n": n}))

    vec = np.zeros(ctx.slots)
    lower = ev.encrypt(vec, level=ctx.top_level - 1)  # a ciphertext one level down
    fresh = ev.encrypt(vec)
    seal = fresh.seal
    seal.scale = seal.scale * 2  # a ciphertext at the wrong scale
    rescaled = Ciphertext(seal, ctx)
    other_model = CkksClientModel(ckks_artifact[1])
    other_keys = CkksClientModel(ckks_artifact[0]).keygen(modes=("single",))
    cases = [
        (other_model.encrypt(other_model.keygen(modes=("single",)), digits.x_test[0]), "made for another model"),
        (CkksClientModel(ckks_artifact[0]).encrypt(other_keys, digits.x_test[0]), "another CKKS context"),
        (forged([lower]), "level"),
        (forged([rescaled]), "scale"),
        (forged([fresh, fresh]), "expected 1"),
        (forged([fresh], mode="both"), "mode"),
        (good[:-100], "truncated"),
        (frame(Kind.OUTPUT_CIPHERTEXT, digest, good[38:]), "expected input ciphertext"),
    ]
    for body, words in cases:
        for path in ("/infer", "/jobs"):
            r = _post(url, f"/v1/sessions/{sid}{path}", body, headers)
            assert 400 <= r.status_code < 500, (words, r.status_code, r.text)
            assert words in r.json()["detail"], (words, r.json()["detail"])
    # a packed batch with one bad item names the item
    from gravel.protocol import pack_batch

    r = _post(url, f"/v1/sessions/{sid}/jobs", pack_batch([good, forged([lower])]), headers)
    assert r.status_code == 400 and r.json()["detail"].startswith("item 1: "), r.text
    # the session, its keys and the model are all still there and working
    assert session.predict(digits.x_test[5]) == int(program.simulate(digits.x_test[5:6])[0].argmax())
    assert httpx.get(f"{url}/v1/sessions/{sid}", headers=headers).status_code == 200
    assert "sq" in [m["name"] for m in client.models()]


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"bad.gravel/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_broken_ckks_artifact_is_refused_and_leaves_nothing(ckks_server, ckks_artifact):
    import hashlib

    root = ckks_artifact[0].root
    files = {n: (root / n).read_bytes() for n in ("manifest.json", "client.ckks.json", "weights.npz")}
    blobs = sorted(p.name for p in (ckks_server.data_dir / "blobs").rglob("*"))
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-tar"}

    def deploy(fs: dict[str, bytes]) -> httpx.Response:
        return httpx.post(ckks_server.url + "/v1/models", content=_tar(fs), headers=headers, timeout=120)

    def renamed(manifest: dict) -> bytes:
        manifest["model"]["name"] = "bad"
        return json.dumps(manifest).encode()

    # a weight altered, its file's hash updated in the manifest: the program hash in the client spec catches it
    with np.load(io.BytesIO(files["weights.npz"]), allow_pickle=False) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    first = min(arrays)
    arrays[first].flat[0] += 1.0
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    weights = buf.getvalue()
    m = json.loads(files["manifest.json"])
    m["files"]["weights.npz"] = hashlib.sha256(weights).hexdigest()
    r = deploy({**files, "manifest.json": renamed(m), "weights.npz": weights})
    assert r.status_code == 400 and "do not match the client spec's program hash" in r.json()["detail"], r.text
    # damaged weights (a byte of the zip flipped)
    damaged = bytearray(files["weights.npz"])
    damaged[-200] ^= 1
    m["files"]["weights.npz"] = hashlib.sha256(damaged).hexdigest()
    r = deploy({**files, "manifest.json": renamed(m), "weights.npz": bytes(damaged)})
    assert r.status_code == 400 and "weights.npz" in r.json()["detail"], r.text
    # a file missing, a file of the other backend, a manifest field of the wrong type
    r = deploy({"manifest.json": renamed(json.loads(files["manifest.json"])), "weights.npz": files["weights.npz"]})
    assert r.status_code == 400 and "missing client.ckks.json" in r.json()["detail"], r.text
    r = deploy({**files, "manifest.json": renamed(json.loads(files["manifest.json"])), "server.zip": b"PK"})
    assert r.status_code == 400 and "server.zip in a ckks artifact" in r.json()["detail"], r.text
    m = json.loads(files["manifest.json"])
    m["packing"]["batch"]["block"] = "many"
    r = deploy({**files, "manifest.json": renamed(m)})
    assert r.status_code == 400 and "packing.batch.block" in r.json()["detail"], r.text
    assert httpx.get(ckks_server.url + "/v1/models/bad").status_code == 404
    assert sorted(p.name for p in (ckks_server.data_dir / "blobs").rglob("*")) == blobs
