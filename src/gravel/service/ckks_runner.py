"""The service's side of a CKKS model: what the engines, the deploy and the routes call.

`CkksServerModel` gives a `gravel.ckks.CkksServer` the calls of the TFHE `ServerModel` that the
engines use (load the evaluation keys, load an input, run, frame the output), so a CKKS model
runs in the engines' existing path; `check_input` is the full check of an input against a
session's keys (level, scale, key set, packing), run when the input is submitted.

Sizes: SEAL compresses keys and ciphertexts, so their lengths vary by a few bytes between key
sets, and an input's length depends on how many images it packs. At deploy the server makes a
throwaway key set for both packings; its length plus a margin is the model's key limit (not an
exact size, as TFHE's is); inputs are held to the server's input limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gravel.errors import InferenceCancelled
from gravel.protocol import Manifest
from gravel.protocol.framing import Kind, unframe

__all__ = ["CkksServerModel", "check_ckks_keys", "ckks_key_limit"]

KEY_MARGIN = 1.02  # a throwaway key set's length times this, plus KEY_SLACK, bounds a client's
KEY_SLACK = 64 << 10


class CkksStageTrace:
    def __init__(self, seconds: float) -> None:
        self.stage, self.shards, self.seconds, self.shard_seconds = "ckks", 1, seconds, [seconds]


class CkksServerModel:
    """A CKKS artifact with the calls the service's engines make of a `ServerModel`."""

    backend = "ckks"

    def __init__(self, artifact: Path) -> None:
        from gravel.ckks.artifact import load_server

        self.server = load_server(artifact)
        self.digest = self.server.digest

    @staticmethod
    def load(artifact: Path) -> CkksServerModel:
        return CkksServerModel(artifact)

    def load_evaluation_keys(self, data: bytes) -> Any:
        """The session's public context, checked for at least one packing of this model."""
        from gravel.ckks.context import PublicContext

        payload = unframe(bytes(data), Kind.EVALUATION_KEYS, self.digest, "CKKS evaluation keys")
        ctx = PublicContext.load(payload)
        from gravel.ckks.server import check_public_context

        check_public_context(ctx, self.server.program.params, self.server.rotation_steps(), None,
                             conjugate=self.server.program.batch_complex)
        return ctx

    def load_input(self, data: bytes) -> bytes:
        """The input stays bytes: a CKKS input is read against the session's keys in `run`."""
        return data

    def check_input(self, keys: Any, data: bytes) -> None:
        self.server.parse_input(keys, data)

    def run(self, keys: Any, value: bytes, progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> tuple[bytes, list[CkksStageTrace]]:
        """One inference in this process (one backend pass; `should_stop` is asked before it)."""
        if should_stop is not None and should_stop():
            raise InferenceCancelled("inference cancelled before it started")
        t0 = time.perf_counter()
        out = self.server.run(keys, value)
        if progress is not None:
            progress(1, 1)
        return out, [CkksStageTrace(time.perf_counter() - t0)]

    def frame_output(self, value: bytes) -> bytes:
        return value  # CkksServer.run frames its output


def ckks_key_limit(manifest: Manifest) -> int:
    """The most bytes a client's framed evaluation keys for this model may take: a throwaway
    key set for both packings (made here, used for nothing else) plus a margin."""
    from gravel.ckks.client import CkksClient

    client = CkksClient.load(manifest)
    client.keygen(("single", "batch"))
    return int(len(client.evaluation_keys()) * KEY_MARGIN) + KEY_SLACK


def check_ckks_keys(payload_reader: Callable[[], bytes], manifest: dict[str, Any]) -> tuple[str, ...]:
    """Check uploaded CKKS evaluation keys (framed; header already checked) against a deployed
    model's manifest, without loading its weights: no secret key, the model's parameters, and
    every rotation of at least one packing. Returns the packings they serve."""
    from gravel.ckks.context import PublicContext
    from gravel.ckks.params import CkksParams
    from gravel.ckks.server import check_public_context

    ctx = PublicContext.load(payload_reader())
    params = CkksParams.from_json(manifest["backend"]["params"])
    steps = {m: list(manifest["packing"][m]["rotation_steps"]) for m in ("single", "batch")}
    return check_public_context(ctx, params, steps, None,
                                conjugate=bool(manifest["packing"]["batch"].get("complex", False)))

