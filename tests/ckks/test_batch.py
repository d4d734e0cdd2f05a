"""The batch path: SIMD groups, complex packing of the input, baby-step/giant-step block
rotations, the block the compiler chooses, and a batch cut among workers and joined again."""

import numpy as np
import pytest
import torch

from gravel.ckks.artifact import compile_ckks_model, load_client, load_program, load_server
from gravel.ckks.compile import CkksOptions
from gravel.ckks.evaluator import Evaluator
from gravel.ckks.program import MAX_BLOCKS, batch_cost, batch_ops, choose_block
from gravel.errors import KeyMismatchError

TOL = 1e-2


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory, digits, sq_model):
    """Blocks of 64 samples: 150 images are three groups."""
    m = compile_ckks_model(sq_model, digits.x_train[:200], tmp_path_factory.mktemp("b") / "b.gravel",
                           options=CkksOptions(batch_block=64))
    client = load_client(m.root)
    client.keygen(("batch",))
    srv = load_server(m.root)
    return m, client, srv, srv.load_keys(client.evaluation_keys(), ("batch",))


def _reference(model, x):
    with torch.no_grad():
        return model(torch.tensor(x)).numpy()


def test_complex_packed_batch_matches_the_float_model(digits, sq_model, two_groups):
    m, client, srv, ctx = two_groups
    assert load_program(m).batch_complex and m.data["packing"]["batch"]["block"] == 64
    blob = client.encrypt(digits.x_test[:150])
    logits = client.decrypt(srv.run(ctx, blob))
    np.testing.assert_allclose(logits, _reference(sq_model, digits.x_test[:150]), atol=TOL)


def test_the_cost_model_counts_what_the_server_does(digits, two_groups, monkeypatch):
    """batch_ops is what choose_block weighs: it must count the server's real operations."""
    m, client, srv, ctx = two_groups
    counts = {"encodes": 0, "rotations": 0}
    encode, rotate, conjugate = (Evaluator.encode_for_product, Evaluator.rotate, Evaluator.conjugate)

    def counting(name, fn):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(Evaluator, "encode_for_product", counting("encodes", encode))
    monkeypatch.setattr(Evaluator, "rotate", counting("rotations", rotate))
    monkeypatch.setattr(Evaluator, "conjugate", counting("rotations", conjugate))
    srv.run(ctx, client.encrypt(digits.x_test[:150]))
    program = load_program(m)
    ops = batch_ops(program, program.params.slots, program.block, 150)
    assert counts["rotations"] == ops["rotations"]
    assert counts["encodes"] == ops["encodes"]


def test_choose_block_takes_the_cheapest_for_the_batch_size(sq_artifact):
    program = load_program(sq_artifact)
    slots = program.params.slots
    low = max(1, slots // MAX_BLOCKS)
    for batch in (1, 40, 1000):
        block = choose_block(program, slots, batch)
        candidates = [b for b in (2 ** e for e in range(13)) if low <= b <= slots and (b < 2 * batch or b == low)]
        assert block in candidates
        assert batch_cost(program, slots, block, batch) == min(batch_cost(program, slots, b, batch)
                                                               for b in candidates)


def test_a_batch_cut_among_workers_joins_to_the_same_result(digits, two_groups):
    _, client, srv, ctx = two_groups
    blob = client.encrypt(digits.x_test[:150])
    parts = srv.split_batch(blob, 2)
    assert len(parts) == 2
    joined = srv.merge_outputs([srv.run(ctx, p) for p in parts])
    np.testing.assert_allclose(client.decrypt(joined), client.decrypt(srv.run(ctx, blob)), atol=1e-3)
    one_group = client.encrypt(digits.x_test[:10])
    assert srv.split_batch(one_group, 2) == [one_group]


def test_keys_without_the_conjugation_key_are_refused(two_groups):
    m, _, srv, _ = two_groups
    client = load_client(m.root)
    client.batch_complex = False  # a client that ignores the spec's complex packing
    client.keygen(("batch",))
    with pytest.raises(KeyMismatchError, match="complex-conjugation key"):
        srv.load_keys(client.evaluation_keys(), ("batch",))
