"""The compute child of a Ray worker (cluster/compute.py), without Ray: its pipe protocol, a
real encrypted shard through it, errors as answers, and its death with its parent."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gravel.cluster.compute import ChildDied, ComputeChild, read_frame, write_frame


def test_frames_round_trip_and_a_cut_stream_is_named():
    buf = io.BytesIO()
    blobs = [b"", b"x" * 100_000, bytes(range(256))]
    write_frame(buf, {"op": "run", "stage": 3}, blobs)
    write_frame(buf, {"op": "ping"})
    data = buf.getvalue()
    src = io.BytesIO(data)
    assert read_frame(src) == ({"op": "run", "stage": 3, "blobs": 3}, blobs)
    assert read_frame(src) == ({"op": "ping", "blobs": 0}, [])
    with pytest.raises(EOFError):
        read_frame(io.BytesIO(data[:50]))  # inside the first frame's second blob


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_real_shard_through_the_child_equals_this_process(client_keys, digits, digits_artifact):
    from gravel.protocol import Kind, frame, unframe
    from gravel.server import ServerModel

    client, keys = client_keys
    server = ServerModel.load(digits_artifact)
    ek = keys.evaluation_keys()
    ct = client.encrypt(keys, digits.x_test[0])
    child = ComputeChild(str(digits_artifact))
    try:
        payload = unframe(ct, Kind.INPUT_CIPHERTEXT, server.digest, "input")
        with pytest.raises(RuntimeError, match="KeyError"):  # no keys for this session yet
            child.run("s1", -1, 0, [payload])
        child.load_keys("s1", unframe(ek, Kind.EVALUATION_KEYS, server.digest, "keys"))
        out, seconds = child.run("s1", -1, 0, [payload])
        assert seconds > 0
        expected = client.decrypt(keys, server.run_bytes(ek, ct)[0])
        np.testing.assert_array_equal(client.decrypt(keys, frame(Kind.OUTPUT_CIPHERTEXT, server.digest, out)), expected)
        with pytest.raises(RuntimeError, match="corrupt|deserial|Error"):  # damaged input: an answer, not a crash
            child.run("s1", -1, 0, [payload[: len(payload) // 2]])
        child.drop("s1")
        with pytest.raises(RuntimeError, match="KeyError"):
            child.run("s1", -1, 0, [payload])
    finally:
        child.close()
    assert not _alive(child.proc.pid)
    with pytest.raises(ChildDied):
        child.run("s1", -1, 0, [b""])


PARENT = """
import sys, time
from gravel.cluster.compute import ComputeChild
c = ComputeChild(sys.argv[1])
print(c.proc.pid, flush=True)
time.sleep(600)
"""


def test_the_child_dies_with_its_parent(digits_artifact):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(digits_artifact)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        parent.kill()


def test_an_artifact_that_does_not_load_is_one_clear_error(tmp_path):
    with pytest.raises(ChildDied, match="did not load"):
        ComputeChild(str(tmp_path / "missing.gravel"))
