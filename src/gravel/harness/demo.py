"""The main job on embedded defaults: the whole private path through a real server.

Train a small QAT model on the 8x8 digits, compile it, start `gravel serve` with an embedded
Ray, deploy the model as its owner, then act as a client: generate keys, upload the
evaluation keys, encrypt test images, predict through the server, decrypt, and compare with
the clear quantized model.
"""

from __future__ import annotations

import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from gravel.client import Client
from gravel.compiler import QuantConfig, compile_model, load_graph
from gravel.data import Dataset
from gravel.harness.common import calib_images
from gravel.model import Checkpoint, build_model, save_checkpoint, train
from gravel.protocol import Manifest
from gravel.service.process import ServiceProcess

__all__ = ["run_demo", "small_artifact"]


def small_artifact(data: Dataset, work: Path, hidden: tuple[int, ...] = (64, 32), epochs: int = 30,
                   max_shards: int = 1, p_error: float | None = None, rounding: str = "auto",
                   progress: bool = False, say=print) -> Manifest:
    """Train a small QAT MLP and compile it: the model of the demo and the service benchmarks."""
    t = time.perf_counter()
    model, opts = build_model("mlp", data.image_shape, data.num_classes, hidden=list(hidden))
    metrics = train(model, data, epochs=epochs, progress=progress)
    ckpt = work / "model.pt"
    save_checkpoint(Checkpoint("mlp", opts, data.image_shape, data.num_classes, data.name, model, metrics), ckpt)
    say(f"[1/5] trained a 2-bit-input, 4-bit-weight MLP on {data.name} in {time.perf_counter() - t:.1f} s "
        f"(test accuracy {metrics['test_accuracy']:.4f})")
    t = time.perf_counter()
    manifest = compile_model(ckpt, calib_images(data, 500), work / f"{data.name}.gravel",
                             QuantConfig(rounding=rounding), max_shards=max_shards,
                             name=data.name, overwrite=True, **({"p_error": p_error} if p_error else {}))
    say(f"[2/5] compiled to {manifest.data['stats']['pbs_count']} table lookups, up to {max_shards} shards per "
        f"layer, in {time.perf_counter() - t:.1f} s")
    return manifest


def run_demo(data: Dataset, samples: int = 10, epochs: int = 30, workdir: str | None = None,
             executor: str = "ray", progress: bool = True, say=print) -> dict[str, Any]:
    work = Path(workdir or tempfile.mkdtemp(prefix="gravel-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = small_artifact(data, work, epochs=epochs, max_shards=min(16, os.cpu_count() or 1),
                              progress=progress, say=say)
    admin = secrets.token_urlsafe(16)
    t = time.perf_counter()
    with ServiceProcess(work / "server-data", admin, executor=executor) as server:
        say(f"[3/5] server up at {server.url} ({executor}) in {time.perf_counter() - t:.1f} s; "
            f"log: {server.log}")
        with Client(server.url, token=admin, cache_dir=work / "client-cache", progress=progress) as client:
            client.deploy(manifest.root)
            t = time.perf_counter()
            session = client.session(manifest.name)
            session_s = time.perf_counter() - t
            say(f"[4/5] deployed '{manifest.name}'; client made keys and opened session {session.id} in "
                f"{session_s:.1f} s")
            x, y = data.x_test[:samples], data.y_test[:samples]
            clear = load_graph(manifest).predict(x)
            enc_s, rt_s, dec_s, preds = [], [], [], []
            for image in x:
                t0 = time.perf_counter()
                ct = session.encrypt(image)
                t1 = time.perf_counter()
                out = session.infer(ct)
                t2 = time.perf_counter()
                preds.append(int(session.model.predict(session.keys, out)))
                t3 = time.perf_counter()
                enc_s.append(t1 - t0), rt_s.append(t2 - t1), dec_s.append(t3 - t2)
            key_bytes = len(session.keys.evaluation_keys())
    r = {
        "samples": len(x),
        "accuracy_clear": float((clear == y).mean()),
        "accuracy_encrypted": float(sum(int(p == t) for p, t in zip(preds, y)) / len(x)),
        "agreement": float(sum(int(p == c) for p, c in zip(preds, clear)) / len(x)),
        "session_s": round(session_s, 3),
        "encrypt_s": round(statistics.median(enc_s), 4),
        "roundtrip_s": round(statistics.median(rt_s), 4),
        "decrypt_s": round(statistics.median(dec_s), 4),
        "eval_key_bytes": key_bytes,
        "input_ct_bytes": len(ct),
        "output_ct_bytes": len(out),
    }
    say(f"[5/5] {r['samples']} test images through the server: accuracy clear {r['accuracy_clear']:.3f}, "
        f"encrypted {r['accuracy_encrypted']:.3f}, agreement {r['agreement']:.3f}")
    say(f"  timings (medians): encrypt {r['encrypt_s'] * 1000:.0f} ms, server round trip {r['roundtrip_s']:.2f} s, "
        f"decrypt {r['decrypt_s'] * 1000:.1f} ms; session set-up {r['session_s']:.1f} s")
    say(f"  sizes: evaluation keys {key_bytes / 1e6:.1f} MB (uploaded once), input {len(ct) / 1e3:.1f} kB, "
        f"output {len(out) / 1e3:.1f} kB")
    return r
