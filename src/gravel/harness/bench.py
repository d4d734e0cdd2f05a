"""`gravel bench`: accuracy, agreement, latency and sizes of real encrypted inference."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gravel.client import ClientModel
from gravel.compiler import QuantConfig, load_graph
from gravel.data import Dataset
from gravel.harness.common import ensure_artifact
from gravel.server import ServerModel

__all__ = ["bench", "format_bench"]


def bench(
    model: str | Path,
    data: Dataset,
    samples: int = 10,
    config: QuantConfig = QuantConfig(),
    progress: bool = True,
    **compile_kwargs: Any,
) -> dict[str, Any]:
    """Encrypt, run and decrypt `samples` test images; medians of per-image times."""
    manifest, tmp = ensure_artifact(model, data, config=config, **compile_kwargs)
    try:
        client = ClientModel(manifest)
        server = ServerModel(manifest)
        graph = load_graph(manifest)
        x, y = data.x_test[:samples], data.y_test[:samples]
        clear = graph.predict(x)
        t = time.perf_counter()
        keys = client.keygen()
        eval_keys = keys.evaluation_keys()
        keygen_s = time.perf_counter() - t
        server_keys = server.load_evaluation_keys(eval_keys)
        enc, lat, dec, preds = [], [], [], []
        in_bytes = out_bytes = 0
        for i in tqdm(range(len(x)), desc="encrypted inference", unit="img", disable=not progress, leave=False):
            t = time.perf_counter()
            ct = client.encrypt(keys, x[i])
            enc.append(time.perf_counter() - t)
            value = server.load_input(ct)
            t = time.perf_counter()
            out, _ = server.run(server_keys, value)
            lat.append(time.perf_counter() - t)
            out_ct = server.frame_output(out)
            t = time.perf_counter()
            preds.append(client.predict(keys, out_ct))
            dec.append(time.perf_counter() - t)
            in_bytes, out_bytes = len(ct), len(out_ct)
        preds_arr = np.asarray(preds)
        return {
            "model": manifest.name,
            "dataset": data.name,
            "samples": int(len(x)),
            "accuracy_clear": float((clear == y).mean()),
            "accuracy_encrypted": float((preds_arr == y).mean()),
            "agreement": float((preds_arr == clear).mean()),
            "latency_s": statistics.median(lat),
            "keygen_s": keygen_s,
            "encrypt_s": statistics.median(enc),
            "decrypt_s": statistics.median(dec),
            "eval_key_bytes": len(eval_keys),
            "input_ct_bytes": in_bytes,
            "output_ct_bytes": out_bytes,
            "pbs_count": manifest.data["stats"]["pbs_count"],
            "workers": 1,
            "shards": [row["shards"] for row in manifest.plan],
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_bench(result: dict[str, Any]) -> str:
    """The lines `gravel bench` prints for a `bench` result: one `key value` per line."""
    return "\n".join(f"{key:20} {value}" for key, value in result.items())
