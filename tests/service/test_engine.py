"""The local engine on its own (real encryption, in this process): cancellation between
stages, and its key cache bounded by bytes."""

from __future__ import annotations

import pytest

from gravel.errors import InferenceCancelled
from gravel.service.engine import KeyCache, LocalEngine


def test_cancellation_stops_between_stages(client_keys, digits, digits_artifact):
    client, keys = client_keys
    engine = LocalEngine()
    ct = client.encrypt(keys, digits.x_test[0])
    evaluation = keys.evaluation_keys()
    stages = []

    def stop_after_first_stage() -> bool:
        return len(stages) >= 1

    with pytest.raises(InferenceCancelled, match="cancelled at stage1"):
        engine.infer("digits", digits_artifact, "s", lambda: evaluation, ct,
                     lambda done, total: stages.append((done, total)), should_stop=stop_after_first_stage)
    assert len(stages) == 1 and stages[0][1] > 1  # one stage of several ran, then it stopped
    # Nothing is left broken: the same engine and session then run the whole inference.
    full = []
    out = engine.infer("digits", digits_artifact, "s", lambda: evaluation, ct,
                       lambda done, total: full.append(done), should_stop=lambda: False)
    assert full == list(range(1, stages[0][1] + 1))
    assert client.decrypt(keys, out).shape == (10,)
    assert len(engine.key_cache) == 1  # the keys were loaded once, for both calls


def test_key_cache_evicts_by_bytes():
    cache = KeyCache(budget=100)
    assert cache.put("a", "A", 60) == []
    assert cache.put("b", "B", 30) == []
    assert cache.get("a") == "A"  # a is now the most recently used
    assert cache.put("c", "C", 30) == [("b", "B")]
    assert cache.bytes == 90 and len(cache) == 2
    assert cache.put("huge", "H", 101) == [("huge", "H")]  # used once, never kept
    assert cache.get("huge") is None and cache.bytes == 90
    assert cache.pop_where(lambda k: k == "a") == [("a", "A")] and cache.bytes == 30
