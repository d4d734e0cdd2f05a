"""Evaluate an artifact's program shard by shard, stage by stage, in this process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gravel.errors import BlobFormatError, InferenceCancelled
from gravel.protocol import Kind, Manifest, frame, load_manifest, pack_parts, unframe
from gravel.protocol.manifest import INPUT, shard_function, stage_arguments

__all__ = ["ServerModel", "StageTrace", "parse_blob"]


def parse_blob(data: bytes, kind: Kind, digest: bytes) -> tuple[bytes, object]:
    """Check a framed blob from a client and parse it with the backend's own deserializer.

    Returns (payload, backend object). Bytes of another kind or model raise KeyMismatchError
    (from `unframe`); bytes the backend cannot parse raise BlobFormatError naming what they
    were meant to be, never the backend's bare exception.
    """
    from concrete import fhe

    payload = unframe(data, kind, digest, kind.label)
    loader = fhe.EvaluationKeys.deserialize if kind == Kind.EVALUATION_KEYS else fhe.Value.deserialize
    try:
        return payload, loader(payload)
    except Exception as exc:  # noqa: BLE001 - the backend raises RuntimeError and others
        raise BlobFormatError(f"{kind.label}: corrupt or truncated ({exc})") from exc


@dataclass
class StageTrace:
    stage: str
    shards: int
    seconds: float
    shard_seconds: list[float]


class ServerModel:
    def __init__(self, manifest: Manifest) -> None:
        from concrete import fhe

        self.manifest = manifest
        self.digest = manifest.digest
        self._server = fhe.Server.load(manifest.path("server.zip"))
        # The whole network as one function, where the compiler verified that it reads and
        # writes the same ciphertexts as the stages: one backend call instead of one per stage.
        self.fused = manifest.data.get("fused", {}).get("function")

    @staticmethod
    def load(artifact: str | Path) -> ServerModel:
        return ServerModel(load_manifest(artifact, role="server"))

    def load_evaluation_keys(self, data: bytes):
        return parse_blob(data, Kind.EVALUATION_KEYS, self.digest)[1]

    def load_input(self, data: bytes):
        return parse_blob(data, Kind.INPUT_CIPHERTEXT, self.digest)[1]

    def run_shard(self, stage: int, shard: int, parts: list, keys):
        name = shard_function(self.manifest.plan[stage], shard)
        return self._server.run(*parts, evaluation_keys=keys, function_name=name)

    def run(self, keys, value, progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, whole: bool | None = None) -> tuple[object, list[StageTrace]]:
        """One inference in this process; returns the output Value (or, stage by stage where
        the last stage returns partial outputs, the list of them) and a trace.

        The fused function where the artifact has one (`whole=None`, the fastest here: one
        backend call), else (or with `whole=False`) stage by stage, shards one after another.

        `progress(stages_done, stages)` is called after each stage, for long inferences.
        `should_stop()` is asked before every backend call (a fused program makes just one);
        when it answers True the inference stops there with InferenceCancelled."""
        stop = should_stop or (lambda: False)
        if stop():
            raise InferenceCancelled("inference cancelled before it started")
        if self.fused and whole is not False:
            t0 = time.perf_counter()
            out = self._server.run(value, evaluation_keys=keys, function_name=self.fused)
            seconds = time.perf_counter() - t0
            if progress is not None:
                progress(1, 1)
            return out, [StageTrace(self.fused, 1, seconds, [seconds])]
        outputs: dict[str, list] = {INPUT: [value]}
        trace = []
        for i, row in enumerate(self.manifest.plan):
            parts = stage_arguments(row, outputs)
            t0 = time.perf_counter()
            outs, times = [], []
            for j in range(row["shards"]):
                if stop():
                    raise InferenceCancelled(f"inference cancelled at {row['name']} shard {j}")
                ts = time.perf_counter()
                outs.append(self.run_shard(i, j, parts, keys))
                times.append(time.perf_counter() - ts)
            trace.append(StageTrace(row["name"], row["shards"], time.perf_counter() - t0, times))
            outputs[row["name"]] = outs
            if progress is not None:
                progress(i + 1, len(self.manifest.plan))
        last = outputs[self.manifest.plan[-1]["name"]]
        return (last[0] if len(last) == 1 else last), trace

    @staticmethod
    def output_payload(out) -> bytes:
        """The bytes of what `run` returned: one value, or the parts of a partial output."""
        return pack_parts([v.serialize() for v in (out if isinstance(out, list) else [out])])

    def frame_output(self, out) -> bytes:
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, self.output_payload(out))

    def run_bytes(self, evaluation_keys: bytes, ciphertext: bytes) -> tuple[bytes, list[StageTrace]]:
        keys = self.load_evaluation_keys(evaluation_keys)
        out, trace = self.run(keys, self.load_input(ciphertext))
        return self.frame_output(out), trace
