"""Benchmark of the CKKS backend, every role in one process but through the real bytes.

The client makes keys and encrypts; the server sees only the framed public context and input
blobs (it loads them as a remote server would) and returns an output blob; the client decrypts.
Timings are the server's evaluation alone (`latency_s`, `batch_latency_s`), medians where
repeated; the key and ciphertext sizes are the bytes that would cross the network.

Accuracy: `accuracy_clear` is the float model's (the imported graph in float64),
`accuracy_encrypted` the decrypted logits', `agreement` the share of samples whose argmax
matches the float model's, `max_abs_error` the worst logit difference to the float model (CKKS
noise plus, for fitted activations, the polynomials' error); `max_abs_error_vs_program` the
worst difference to the same polynomial program in the clear (CKKS noise alone). Given an
artifact rather than a model, the reference is the clear polynomial program.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gravel.ckks.artifact import compile_ckks_model, load_client, load_program, load_server
from gravel.ckks.compile import CkksOptions
from gravel.data import Dataset
from gravel.errors import InputError
from gravel.protocol import load_manifest

__all__ = ["bench_ckks", "format_ckks_bench"]


def _float_logits(model: Any, x: np.ndarray) -> np.ndarray | None:
    from gravel.compiler.ir import evaluate
    from gravel.compiler.passes import canonicalise
    from gravel.compiler.pipeline import import_model
    from gravel.compiler.quantize import conform_batch

    graph, _ = import_model(model, x[:1])
    graph = canonicalise(graph)
    return np.asarray(evaluate(graph, conform_batch(x, graph.input_shape))).reshape(len(x), -1)


def bench_ckks(model: Any, data: Dataset, samples: int = 10, batch: int | None = None,
               calib: int = 500, options: CkksOptions | None = None,
               progress: bool = False, workers: int | None = None,
               ray_address: str | None = None) -> dict[str, Any]:
    """One image at a time over `samples` test images, or (with `batch`) one batched
    inference of `batch` test images. `model`: an artifact directory or anything
    `compile_ckks_model` takes (compiled into a temporary directory). `workers`: a batch also
    runs with its groups spread over that many Ray workers (`CkksRayExecutor`), timed in the
    same run as the one-process path; `batch_latency_s` is then the faster of the two. One
    image at a time also runs with its first matrix split among the workers
    (`workers_latency_s`, beside the one-process `latency_s`)."""
    from gravel.harness.common import calib_images, calib_labels

    if samples < 1 or (batch is not None and batch < 1):
        raise InputError("samples and batch must be at least 1")
    tmp = None
    t0 = time.perf_counter()
    path = Path(model) if isinstance(model, (str, Path)) else None
    if path is not None and (path / "manifest.json").is_file():
        manifest = load_manifest(path, role="all", backends=("ckks",))
        reference_model = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gravel-ckks-")
        manifest = compile_ckks_model(model, calib_images(data, calib), Path(tmp.name) / "model.gravel",
                                      calib_labels(data, calib), options or CkksOptions())
        reference_model = model
    compile_s = time.perf_counter() - t0
    try:
        n = batch if batch is not None else samples
        x, y = data.x_test[:n], np.asarray(data.y_test[:n])
        program = load_program(manifest)
        clear = program.simulate(x)
        ref = _float_logits(reference_model, x) if reference_model is not None else clear
        client, server = load_client(manifest), load_server(manifest)
        modes = ("batch",) if batch is not None else ("single",)
        t = time.perf_counter()
        client.keygen(modes)
        keygen_s = time.perf_counter() - t
        keys = client.evaluation_keys()
        ctx = server.load_keys(keys, modes)
        result: dict[str, Any] = {
            "backend": "ckks", "model": manifest.name, "data": data.name,
            "params": program.params.to_json(), "depth": program.depth,
            "compile_s": round(compile_s, 3), "keygen_s": round(keygen_s, 3),
            "eval_key_bytes": len(keys),
            "rotation_keys": len(client.single_steps if batch is None else client.batch_steps),
            "reference": "float model" if reference_model is not None else "clear CKKS program",
        }
        if batch is None:
            lat, enc, dec, outs = [], [], [], []
            in_bytes = out_bytes = 0
            for i in range(n):
                t = time.perf_counter()
                blob = client.encrypt(x[i:i + 1], "single")
                enc.append(time.perf_counter() - t)
                t = time.perf_counter()
                reply = server.run(ctx, blob)
                lat.append(time.perf_counter() - t)
                t = time.perf_counter()
                outs.append(client.decrypt(reply)[0])
                dec.append(time.perf_counter() - t)
                in_bytes, out_bytes = len(blob), len(reply)
                if progress:
                    print(f"  image {i + 1}/{n}: {lat[-1]:.3f} s", flush=True)
            logits = np.stack(outs)
            if workers and workers > 1:  # the first matrix split among workers, same images
                from gravel.cluster.ckks_executor import CkksRayExecutor

                executor = CkksRayExecutor(manifest.root, workers=workers, address=ray_address,
                                           split_single=True)
                try:
                    executor.warm(keys)  # every worker loads the keys before the timing
                    lat_w, outs_w = [], []
                    for i in range(n):
                        blob = client.encrypt(x[i:i + 1], "single")
                        t = time.perf_counter()
                        reply = executor.run(keys, blob)
                        lat_w.append(time.perf_counter() - t)
                        outs_w.append(client.decrypt(reply)[0])
                finally:
                    executor.shutdown()
                result.update(workers=workers, workers_latency_s=round(statistics.median(lat_w), 4),
                              workers_agreement=float((np.stack(outs_w).argmax(1) == logits.argmax(1)).mean()))
            result.update(samples=n, latency_s=round(statistics.median(lat), 4),
                          latency_first_s=round(lat[0], 4),
                          encrypt_s=round(statistics.median(enc), 4),
                          decrypt_s=round(statistics.median(dec), 4),
                          input_ct_bytes=in_bytes, output_ct_bytes=out_bytes)
        else:
            t = time.perf_counter()
            blob = client.encrypt(x, "batch")
            enc_s = time.perf_counter() - t
            t = time.perf_counter()
            reply = server.run(ctx, blob)
            one_s = time.perf_counter() - t
            lat_s, path = one_s, "one process"
            if workers:
                from gravel.cluster.ckks_executor import CkksRayExecutor

                executor = CkksRayExecutor(manifest.root, workers=workers, address=ray_address)
                try:
                    executor.warm(keys)  # every worker loads the keys before the timing
                    t = time.perf_counter()
                    reply_w = executor.run(keys, blob)
                    workers_s = time.perf_counter() - t
                finally:
                    executor.shutdown()
                if not np.allclose(client.decrypt(reply_w), client.decrypt(reply), atol=1e-2):
                    raise InputError("the workers' batch result differs from the one-process result")
                result.update(workers=workers, one_process_s=round(one_s, 3),
                              workers_s=round(workers_s, 3), speedup=round(one_s / workers_s, 3))
                if workers_s < one_s:
                    lat_s, path, reply = workers_s, f"{workers} Ray workers", reply_w
            t = time.perf_counter()
            logits = client.decrypt(reply)
            dec_s = time.perf_counter() - t
            result.update(samples=n, batch=n, batch_latency_s=round(lat_s, 3), path=path,
                          block=program.block, groups=-(-n // program.block),
                          per_image_s=round(lat_s / n, 5), encrypt_s=round(enc_s, 3),
                          decrypt_s=round(dec_s, 3), input_ct_bytes=len(blob),
                          output_ct_bytes=len(reply))
        pred, ref_pred = logits.argmax(1), ref.argmax(1)
        result.update(
            agreement=float((pred == ref_pred).mean()),
            accuracy_clear=float((ref_pred == y).mean()),
            accuracy_encrypted=float((pred == y).mean()),
            max_abs_error=float(np.max(np.abs(logits - ref))),
            max_abs_error_vs_program=float(np.max(np.abs(logits - clear))),
        )
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_ckks_bench(r: dict[str, Any]) -> str:
    """A few readable lines of `bench_ckks`'s result."""
    p = r["params"]
    lines = [(f"CKKS {r['model']} on {r['data']}: N={p['poly_modulus_degree']}, depth {r['depth']}, "
              f"{r['rotation_keys']} rotation keys, {r['eval_key_bytes'] / 1e6:.1f} MB of evaluation keys")]
    if "batch" in r:
        lines.append(f"  batch of {r['batch']}: {r['batch_latency_s']:.2f} s on the server "
                     f"({1000 * r['per_image_s']:.1f} ms per image); input {r['input_ct_bytes'] / 1e6:.1f} MB")
    else:
        lines.append(f"  one image: {r['latency_s']:.3f} s median on the server over {r['samples']}; "
                     f"input {r['input_ct_bytes'] / 1e3:.0f} kB, output {r['output_ct_bytes'] / 1e3:.0f} kB")
    lines.append(f"  accuracy {100 * r['accuracy_encrypted']:.1f} % encrypted, {100 * r['accuracy_clear']:.1f} % "
                 f"clear; agreement {100 * r['agreement']:.1f} %; max logit error {r['max_abs_error']:.3g}")
    return "\n".join(lines)
