"""The backend of a Ray worker, in a child process of its own.

Measured on the 2-core VM: the same ResNet shard function takes 28-29 s in a plain pinned
process beside a second busy one, 30-33 s inside a pinned Ray worker (whose main thread is
preempted about 200 times a second by the worker's own threads and Ray's processes, a plain
process 35 times), and 28.8 s in a plain child process of a Ray actor. So each ShardWorker
starts one child (`python -m gravel.cluster.compute ARTIFACT_DIR`), which inherits the worker's
cores and environment, holds the server program and the sessions' evaluation keys, and runs
shards on request; the actor only moves bytes between Ray and the child.

The pipe between them carries frames of one JSON header and raw byte blobs (never a pickle):

    u32 header length | header (JSON) | per blob: u64 length | bytes

Requests: {"op": "keys", "session"} + the keys; {"op": "drop", "session"};
{"op": "run", "session", "stage", "shard"} + the shard's input parts (stage -1: the whole
network, fused). Answers: {"ok": true, "compute_s"} + the output, or {"error": "..."}.
The child exits when its parent does (PR_SET_PDEATHSIG) or closes the pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Any, BinaryIO

__all__ = ["ChildDied", "ComputeChild", "InProcess", "main", "read_frame", "write_frame"]

_HEADER = struct.Struct(">I")
_BLOB = struct.Struct(">Q")


class ChildDied(RuntimeError):
    """The compute child exited or its pipe broke."""


def write_frame(out: BinaryIO, header: dict[str, Any], blobs: list[bytes] = ()) -> None:
    head = json.dumps({**header, "blobs": len(blobs)}).encode()
    out.write(_HEADER.pack(len(head)) + head)
    for blob in blobs:
        out.write(_BLOB.pack(len(blob)))
        out.write(blob)
    out.flush()


def _read_exact(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    if data is None or len(data) != n:
        raise EOFError("pipe closed")
    return data


def read_frame(src: BinaryIO) -> tuple[dict[str, Any], list[bytes]]:
    (size,) = _HEADER.unpack(_read_exact(src, _HEADER.size))
    header = json.loads(_read_exact(src, size))
    blobs = []
    for _ in range(int(header.get("blobs", 0))):
        (n,) = _BLOB.unpack(_read_exact(src, _BLOB.size))
        blobs.append(_read_exact(src, n))
    return header, blobs


class ComputeChild:
    """The parent's handle: starts the child and asks it to run shards, one at a time."""

    def __init__(self, artifact_dir: str, start_timeout_s: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gravel.cluster.compute", str(artifact_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ),
        )
        self.sessions: set[str] = set()
        header, _ = self._ask({"op": "ping"}, [])
        if not header.get("ok"):
            raise ChildDied(f"the compute child failed to load the artifact: {header.get('error')}")

    def _ask(self, header: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        try:
            if self.proc.poll() is not None:
                raise EOFError("not running")
            with _no_sigpipe():
                write_frame(self.proc.stdin, header, blobs)
            return read_frame(self.proc.stdout)
        except (BrokenPipeError, EOFError, OSError) as exc:
            code = self.proc.poll()
            raise ChildDied(f"the compute child exited ({'status ' + str(code) if code is not None else exc})") from exc

    def load_keys(self, session: str, keys: bytes) -> None:
        header, _ = self._ask({"op": "keys", "session": session}, [keys])
        if not header.get("ok"):
            raise RuntimeError(header.get("error", "evaluation keys refused"))
        self.sessions.add(session)

    def drop(self, session: str) -> None:
        self._ask({"op": "drop", "session": session}, [])
        self.sessions.discard(session)

    def run(self, session: str, stage: int, shard: int, parts: list[bytes]) -> tuple[bytes, float]:
        """One shard (stage -1: the fused whole network); returns its output and compute time."""
        header, blobs = self._ask({"op": "run", "session": session, "stage": stage, "shard": shard}, list(parts))
        if not header.get("ok"):
            raise RuntimeError(header.get("error", "the shard failed"))
        return blobs[0], float(header["compute_s"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class InProcess:
    """The same calls served in this process (GRAVEL_WORKER_CHILD=0: where starting a child
    is not possible, or to compare)."""

    def __init__(self, artifact_dir: str) -> None:
        from gravel.server import ServerModel

        self.model = ServerModel.load(artifact_dir)
        self.keys: OrderedDict[str, Any] = OrderedDict()
        self.pid = os.getpid()

    def load_keys(self, session: str, keys: bytes) -> None:
        _serve(self.model, self.keys, {"op": "keys", "session": session}, [keys])

    def drop(self, session: str) -> None:
        _serve(self.model, self.keys, {"op": "drop", "session": session}, [])

    def run(self, session: str, stage: int, shard: int, parts: list[bytes]) -> tuple[bytes, float]:
        header, blobs = _serve(self.model, self.keys, {"op": "run", "session": session, "stage": stage,
                                                       "shard": shard}, parts)
        return blobs[0], header["compute_s"]


@contextlib.contextmanager
def _no_sigpipe():
    """Writing to a child that died raises BrokenPipeError, also in a process where concrete's
    runtime (HPX) has made SIGPIPE fatal: the signal is blocked for the write and a pending
    one consumed before it is unblocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        yield
    finally:
        if signal.SIGPIPE not in old:
            signal.sigtimedwait({signal.SIGPIPE}, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent (the Ray worker) dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    """The child: serve requests on stdin/stdout until the pipe closes."""
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the backend prints goes to stderr, not into the protocol
    src = sys.stdin.buffer
    keys: OrderedDict[str, Any] = OrderedDict()
    model, load_error = None, ""
    try:
        from gravel.server import ServerModel

        model = ServerModel.load(argv[0])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the worker
        load_error = f"{type(exc).__name__}: {exc}"
    while True:
        try:
            header, blobs = read_frame(src)
        except EOFError:
            return
        try:
            if model is None:
                raise RuntimeError(f"the artifact did not load: {load_error}")
            answer = _serve(model, keys, header, blobs)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its answer
            answer = ({"error": f"{type(exc).__name__}: {exc}"}, [])
        write_frame(out, *answer)


def _serve(model: Any, keys: OrderedDict, header: dict[str, Any], blobs: list[bytes]) -> tuple[dict, list[bytes]]:
    from concrete import fhe

    op = header["op"]
    if op == "ping":
        return {"ok": True, "pid": os.getpid()}, []
    if op == "keys":
        keys[header["session"]] = fhe.EvaluationKeys.deserialize(blobs[0])
        return {"ok": True}, []
    if op == "drop":
        keys.pop(header["session"], None)
        return {"ok": True}, []
    if op != "run":
        raise ValueError(f"unknown request {op!r}")
    session_keys = keys[header["session"]]
    values = [fhe.Value.deserialize(p) for p in blobs]
    t0 = time.perf_counter()
    if header["stage"] < 0:
        out = model.output_payload(model.run(session_keys, values[0])[0])
    else:
        out = model.run_shard(header["stage"], header["shard"], values, session_keys).serialize()
    return {"ok": True, "compute_s": time.perf_counter() - t0}, [out]


if __name__ == "__main__":
    main()
