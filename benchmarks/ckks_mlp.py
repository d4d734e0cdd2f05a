"""The HomomorphicEncryption.org MNIST MLP (784-128-64-10, x^2 activations) on Gravel's CKKS
backend (issue 12's figures).

    python benchmarks/ckks_mlp.py [--samples 100] [--batch 1000] [--epochs 10]

Trains the model in plain PyTorch on the MNIST 5k training subset, exports it to ONNX, compiles
it with `--backend ckks` (the same code path as `gravel compile`), then through the real bytes
(framed public context, input and output blobs, server loading the keys as a remote one would):

- one image at a time over `--samples` test images: median server latency, key and ciphertext
  sizes, agreement of the argmax with the float model;
- one batched inference of `--batch` test images (SIMD across images), in one process and spread
  over `--workers` Ray workers in the same run: server time of each, accuracy
  against the float model's;
- the same shape with ReLU, converted to polynomial activations by the compiler: test accuracy
  against the float ReLU model's (in the clear; no fine-tuning).

Prints progress on stderr and ONE JSON line on stdout, with the machine's load average before
and after (other work on a shared machine inflates every timing alike).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gravel.ckks.compile import CkksOptions
from gravel.data import load_dataset
from gravel.harness.ckks_bench import bench_ckks
from gravel.harness.demo import train_float_mlp

TARGETS = {"latency_s": 0.5, "agreement": 0.99, "eval_key_bytes": 300e6, "input_ct_bytes": 1e6,
           "batch_latency_s": 20.0, "batch_accuracy_gap": 0.005}


def train(data, epochs: int, seed: int = 0, act: type[nn.Module] | None = None) -> nn.Module:
    """784-128-64-10 with x^2 activations (`act` None) or `act`, on the training set."""
    return train_float_mlp(data, (128, 64), epochs, seed, act)


def relu_conversion(data, epochs: int, calib: int) -> dict:
    """The same shape with ReLU, its activations replaced by the compiler's polynomials:
    test accuracy of the float ReLU model and of the polynomial program (in the clear: the
    encrypted path matches it to CKKS noise, as the x^2 figures show). No fine-tuning."""
    from gravel.ckks.compile import compile_ckks
    from gravel.harness.common import calib_images, calib_labels

    model = train(data, epochs, act=nn.ReLU)
    with torch.no_grad():
        float_acc = float((model(torch.tensor(data.x_test)).argmax(1).numpy() == data.y_test).mean())
    compiled, _ = compile_ckks(model, calib_images(data, calib), calib_labels(data, calib))
    poly_acc = float((compiled.program.simulate(data.x_test).argmax(1) == data.y_test).mean())
    return {"float_relu_accuracy": float_acc, "polynomial_accuracy": poly_acc,
            "degrees": [p.degree for p in compiled.polys], "depth": compiled.program.depth,
            "params": compiled.program.params.to_json(), "within_1.5_points": float_acc - poly_acc <= 0.015}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--precision-bits", type=int, default=CkksOptions().precision_bits)
    parser.add_argument("--calib", type=int, default=500, help="calibration images for the compiler")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="Ray workers for the batch, timed beside one process (default: one per CPU)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    data = load_dataset("mnist")
    t = time.perf_counter()
    model = train(data, args.epochs)
    train_s = time.perf_counter() - t
    with torch.no_grad():
        float_acc = float((model(torch.tensor(data.x_test)).argmax(1).numpy() == data.y_test).mean())
    print(f"trained in {train_s:.0f} s: float test accuracy {float_acc:.4f}", file=sys.stderr)
    options = CkksOptions(precision_bits=args.precision_bits)
    with tempfile.TemporaryDirectory(prefix="gravel-ckks-mlp-") as tmp:
        onnx_path = Path(tmp) / "he_mlp.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, torch.tensor(data.x_test[:1]), str(onnx_path), dynamo=False)
        single = bench_ckks(onnx_path, data, samples=args.samples, options=options, workers=args.workers)
        print(f"single: {single['latency_s']} s median, agreement {single['agreement']}", file=sys.stderr)
        batch = bench_ckks(onnx_path, data, batch=args.batch, options=CkksOptions(
            precision_bits=args.precision_bits, batch_size=args.batch), workers=args.workers)
        print(f"batch: {batch['batch_latency_s']} s for {args.batch}", file=sys.stderr)
    gap = batch["accuracy_clear"] - batch["accuracy_encrypted"]
    relu = relu_conversion(data, args.epochs, args.calib)
    print(f"relu: {relu}", file=sys.stderr)
    met = {
        "latency": single["latency_s"] <= TARGETS["latency_s"],
        "agreement": single["agreement"] >= TARGETS["agreement"],
        "eval_keys": single["eval_key_bytes"] <= TARGETS["eval_key_bytes"],
        "input": single["input_ct_bytes"] <= TARGETS["input_ct_bytes"],
        "batch_latency": batch["batch_latency_s"] <= TARGETS["batch_latency_s"],
        "batch_accuracy": gap <= TARGETS["batch_accuracy_gap"],
    }
    print(json.dumps({
        "benchmark": "ckks_mlp", "model": "784-128-64-10 x^2 (ONNX)", "data": "mnist",
        "float_test_accuracy": float_acc, "params": single["params"], "depth": single["depth"],
        "single": {k: single.get(k) for k in ("samples", "latency_s", "latency_first_s", "workers",
                                              "workers_latency_s", "workers_agreement", "eval_key_bytes",
                                              "rotation_keys", "input_ct_bytes", "output_ct_bytes", "agreement",
                                              "accuracy_clear", "accuracy_encrypted", "max_abs_error")},
        "batch": {k: batch.get(k) for k in ("batch", "batch_latency_s", "path", "one_process_s", "workers",
                                            "workers_s", "speedup", "block", "groups", "per_image_s",
                                            "eval_key_bytes", "input_ct_bytes", "output_ct_bytes", "agreement",
                                            "accuracy_clear", "accuracy_encrypted", "max_abs_error")},
        "relu_converted": relu,
        "targets": TARGETS, "met": met,
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
