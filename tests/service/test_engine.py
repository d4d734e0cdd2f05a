"""The local engine on its own (real encryption): cancellation between backend calls, and its
key cache bounded by bytes.

The engine runs in a child process, as it does in the server, which keeps the backend's server
runtime out of the pytest process: with it run in-process here, 2 of 4 full runs of this
directory ended in a SIGSEGV of pytest a few tests later (in a test that only speaks HTTP);
the cause is not established.
"""

from __future__ import annotations

import json
import subprocess
import sys

from gravel.service.engine import KeyCache

CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from gravel.errors import InferenceCancelled
from gravel.service.engine import LocalEngine
from gravel.server.runner import ServerModel
# The stage chain (an artifact without a fused function runs so): one backend call per shard,
# with a cancellation point before each. (With the fused function there is one call in all.)
_run = ServerModel.run
ServerModel.run = lambda self, *a, **k: _run(self, *a, whole=False, **k)
artifact, keys_file, ct_file = map(Path, sys.argv[1:4])
evaluation, ct = keys_file.read_bytes(), ct_file.read_bytes()
engine = LocalEngine()
stages, asked, report = [], [], {}
try:
    engine.infer("digits", artifact, "s", lambda: evaluation, ct, lambda d, t: stages.append((d, t)),
                 should_stop=lambda: asked.append(1) or len(asked) > 2)
    report["cancelled"] = None
except InferenceCancelled as exc:
    report["cancelled"] = str(exc)
report["stages_before_stop"] = list(stages)
report["stop_asked"] = len(asked)
full = []
out = engine.infer("digits", artifact, "s", lambda: evaluation, ct, lambda d, t: full.append(d),
                   should_stop=lambda: False)
Path(ct_file.with_suffix(".out")).write_bytes(out)
report["full_run"] = full
report["cached_sessions"] = len(engine.key_cache)
print(json.dumps(report))
"""


def test_cancellation_stops_between_backend_calls(client_keys, digits, digits_artifact, tmp_path):
    client, keys = client_keys
    (tmp_path / "keys").write_bytes(keys.evaluation_keys())
    (tmp_path / "ct").write_bytes(client.encrypt(keys, digits.x_test[0]))
    child = subprocess.run([sys.executable, "-c", CHILD, str(digits_artifact), str(tmp_path / "keys"),
                            str(tmp_path / "ct")], capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    # The digits plan is one stage of 4 shards (the output layer folded in): asked before each
    # backend call (once before the inference, then before each shard), the engine stopped
    # before the second shard, and no stage completed.
    assert report["cancelled"] is not None and "cancelled at stage0 shard 1" in report["cancelled"]
    assert report["stop_asked"] == 3 and report["stages_before_stop"] == []
    # Nothing is left broken: the same engine and session then run the whole inference.
    assert report["full_run"] == [1]
    assert client.decrypt(keys, (tmp_path / "ct.out").read_bytes()).shape == (10,)
    assert report["cached_sessions"] == 1  # the keys were loaded once, for both calls


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
