"""Concrete ML's side of `concrete_ml_compare.py`; runs in `.venv-cml` (Concrete ML 1.9).

    .venv-cml/bin/python benchmarks/concrete_ml_inner.py --data runs/compare-mnist.npz --samples 3

Reads the arrays that the outer script wrote (plain .npz, allow_pickle=False) and measures:

- `qat`: Concrete ML's QAT recipe (its "Using Torch" guide): Brevitas `QuantIdentity` quantizers
  and `QuantLinear` layers, 3-bit weights and activations, 784-128-64-10 with ReLU, trained here
  on the 5k MNIST subset (cached as an .npz under runs/), compiled with
  `compile_brevitas_qat_model`;
- `ptq`: the float reference MLP (the same weights as Gravel's side) through
  `compile_torch_model(model, calib, n_bits=6)`.

Input normalisation ((x - 0.1307) / 0.3081, inside the reference model) is done on the client
before quantization by default (`--norm client`): Concrete ML's QAT import refuses a graph that
does not start with a quantizer, and its post-training path, given the normalisation inside the
graph, evaluates it as one extra table lookup per pixel (784) in FHE. Doing it on the client
computes the same function and is what a Concrete ML user would do, so Concrete ML gets its
faster form; `--norm graph` measures the reference model as exported (post-training path only).

Concrete ML 1.9 cannot compile the 784-wide first layer at 6 bits without rounding (a 17-bit
accumulator; table lookups stop at 16 bits), so accumulators are rounded before each lookup,
by default with `rounding_threshold_bits={"n_bits": 6, "method": "approximate"}`, the setting
its examples use (`--rounding none|BITS[:exact|approximate]`); `p_error` is Concrete ML's own
default (2**-40 per lookup) unless `--p-error` is given.

For each: compile, key generation, then per image (one per call) what
`QuantizedModule.forward(x, fhe="execute")` does in 1.9 (pre_processing, quantize_input,
`fhe_circuit.encrypt_run_decrypt`, dequantize_output), step by step so that the server-side
`Circuit.run` is timed apart from client-side quantize+encrypt and decrypt+dequantize; the
first image also goes through `forward(fhe="execute")` itself as a check that both agree.
Prints ONE JSON line keyed by path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from import_models import ReferenceMLP  # the same class Gravel's side uses

N_BITS_QAT = 3
N_BITS_PTQ = 6
MEAN, STD = 0.1307, 0.3081


def _log(msg: str) -> None:
    print(f"[cml] {msg}", file=sys.stderr, flush=True)


def normalise(x: np.ndarray) -> np.ndarray:
    """The reference model's first step, done on the client: flat, (x - mean) / std."""
    return ((x.reshape(len(x), -1) - MEAN) / STD).astype(np.float32)


class FlatMLP(nn.Module):
    """The reference MLP's layers (same parameter names) for inputs normalised on the client."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class QATMLP(nn.Module):
    """Concrete ML's Brevitas recipe at 3 bits, shaped like the reference MLP (normalised input)."""

    def __init__(self, n_bits: int = N_BITS_QAT) -> None:
        import brevitas.nn as qnn

        super().__init__()
        self.quant_inp = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(784, 128, True, weight_bit_width=n_bits, bias_quant=None)
        self.quant2 = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(128, 64, True, weight_bit_width=n_bits, bias_quant=None)
        self.quant3 = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
        self.fc3 = qnn.QuantLinear(64, 10, True, weight_bit_width=n_bits, bias_quant=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_inp(x)
        x = self.quant2(torch.relu(self.fc1(x)))
        x = self.quant3(torch.relu(self.fc2(x)))
        return self.fc3(x)


def train_qat(x: np.ndarray, y: np.ndarray, epochs: int, cache: Path) -> QATMLP:
    """Train (seeded) or load the QAT model; the cache is an .npz of its state dict (delete it
    to retrain after changing the recipe)."""
    torch.manual_seed(0)
    model = QATMLP()
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            model.load_state_dict({k: torch.from_numpy(f[k]) for k in f.files})
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
        _log(f"QAT epoch {epoch + 1}/{epochs}")
    model.eval()
    tmp = cache.with_suffix(".part.npz")
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    tmp.replace(cache)
    return model


def float_mlp(arrays: Any, norm: str) -> nn.Module:
    """The reference weights, in the model itself (`graph`) or behind client-side normalisation."""
    model = ReferenceMLP() if norm == "graph" else FlatMLP()
    state = {k[2:]: torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("w:")}
    model.load_state_dict(state)
    return model.eval()


def measure(qm: Any, x: np.ndarray, y: np.ndarray, x_acc: np.ndarray, y_acc: np.ndarray) -> dict[str, Any]:
    """Keygen, then one encrypted image per call; medians of per-image times."""
    circuit = qm.fhe_circuit
    t = time.perf_counter()
    circuit.keygen(force=True)
    keygen_s = time.perf_counter() - t
    eval_key_bytes = len(circuit.keys.evaluation.serialize())
    clear = qm.forward(x_acc, fhe="disable").argmax(1)
    simulated = qm.forward(x_acc, fhe="simulate").argmax(1)  # lookup errors drawn at its p_error
    enc_t, run_t, dec_t, preds, in_bytes = [], [], [], [], 0
    for i in range(len(x)):
        xi = x[i : i + 1]
        t = time.perf_counter()
        q_in = qm.quantize_input(*qm.pre_processing(xi))
        enc = circuit.encrypt(q_in)
        enc_t.append(time.perf_counter() - t)
        in_bytes = len(enc.serialize())
        t = time.perf_counter()
        out = circuit.run(enc)
        run_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        logits = qm.dequantize_output(circuit.decrypt(out))
        dec_t.append(time.perf_counter() - t)
        preds.append(int(np.argmax(logits)))
        _log(f"image {i}: {run_t[-1]:.2f} s, predicted {preds[-1]}, label {int(y[i])}")
    t = time.perf_counter()
    check = int(np.argmax(qm.forward(x[:1], fhe="execute")))
    forward_s = time.perf_counter() - t
    p = np.asarray(preds)
    n = len(x)
    return {
        "latency_s": statistics.median(run_t),
        "accuracy_encrypted": float((p == y).mean()),
        "accuracy_quantized_2000": float((clear == y_acc).mean()),
        "accuracy_simulated_2000": float((simulated == y_acc).mean()),
        "agreement": float((p == clear[:n]).mean()),
        "samples": n,
        "eval_key_bytes": eval_key_bytes,
        "input_ct_bytes": in_bytes,
        "keygen_s": round(keygen_s, 2),
        "encrypt_s": statistics.median(enc_t),
        "decrypt_s": statistics.median(dec_t),
        "forward_execute_s": round(forward_s, 3),
        "forward_execute_agrees": check == preds[0],
        "pbs_count": int(circuit.programmable_bootstrap_count),
        "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
        **circuit_cost(circuit.statistics),
    }


def circuit_cost(stats: dict[str, Any]) -> dict[str, Any]:
    """Concrete's own cost estimate and bootstrap parameters: comparable when the machine is busy."""
    return {"complexity": float(stats["complexity"]),
            "pbs_params": {str(k): v for k, v in stats["programmable_bootstrap_count_per_parameter"].items()}}


def parse_rounding(text: str) -> dict[str, Any] | None:
    """`none`, `6` or `6:approximate` -> Concrete ML's rounding_threshold_bits."""
    if text.strip().lower() == "none":
        return None
    bits, _, method = text.partition(":")
    method = (method or "exact").strip().lower()
    if not bits.strip().isdigit() or method not in ("exact", "approximate"):
        raise argparse.ArgumentTypeError(
            f"--rounding: expected none, BITS or BITS:exact|approximate (e.g. 6:approximate), got {text!r}")
    return {"n_bits": int(bits), "method": method}


def compile_path(name: str, arrays: Any, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The compiled QuantizedModule, the input transform its images need, and what was used."""
    from concrete.ml.torch.compile import compile_brevitas_qat_model, compile_torch_model

    norm = "client" if name == "qat" else args.norm
    prep = normalise if norm == "client" else (lambda x: x)
    calib = prep(arrays["calib"])
    kwargs: dict[str, Any] = {"rounding_threshold_bits": args.rounding}
    if args.p_error is not None:
        kwargs["p_error"] = args.p_error
    info: dict[str, Any] = {"normalisation": norm}
    if name == "qat":
        cache = args.runs / f"cml-qat-mlp-{N_BITS_QAT}bit-{args.qat_epochs}ep.npz"
        t = time.perf_counter()
        model = train_qat(normalise(arrays["x_train"]), arrays["y_train"], args.qat_epochs, cache)
        info["train_s"] = round(time.perf_counter() - t, 1)
        with torch.no_grad():
            logits = model(torch.from_numpy(normalise(arrays["x_test"])))
        info["accuracy_brevitas_2000"] = float((logits.argmax(1).numpy() == arrays["y_test"]).mean())
        t = time.perf_counter()
        qm = compile_brevitas_qat_model(model, calib, **kwargs)
        info["n_bits"] = N_BITS_QAT
    else:
        t = time.perf_counter()
        qm = compile_torch_model(float_mlp(arrays, norm), calib, n_bits=N_BITS_PTQ, **kwargs)
        info["n_bits"] = N_BITS_PTQ
    info["compile_s"] = round(time.perf_counter() - t, 1)
    info["rounding_threshold_bits"] = args.rounding
    info["p_error"] = qm.fhe_circuit.p_error
    return qm, prep, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help=".npz written by concrete_ml_compare.py")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--paths", default="qat,ptq")
    ap.add_argument("--qat-epochs", type=int, default=20)
    ap.add_argument("--rounding", type=parse_rounding, default="6:approximate",
                    help="rounding_threshold_bits: none, BITS or BITS:exact|approximate")
    ap.add_argument("--p-error", type=float, default=None, help="default: Concrete ML's own")
    ap.add_argument("--norm", choices=["client", "graph"], default="client",
                    help="post-training path: normalise on the client or inside the model")
    ap.add_argument("--runs", type=Path, default=Path(__file__).resolve().parent.parent / "runs")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file; run benchmarks/concrete_ml_compare.py, which writes it")
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("concrete-ml", "concrete-python", "torch", "brevitas")}
    _log(f"versions {versions}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus")
    results: dict[str, Any] = {}
    with np.load(args.data, allow_pickle=False) as arrays:
        x_acc, y_acc = arrays["x_test"], arrays["y_test"]
        for name in [p.strip() for p in args.paths.split(",") if p.strip()]:
            try:
                if name not in ("qat", "ptq"):
                    raise ValueError(f"unknown path {name!r}; choose qat or ptq")
                qm, prep, info = compile_path(name, arrays, args)
                _log(f"{name}: compiled in {info['compile_s']} s; running {args.samples} encrypted images")
                r = measure(qm, prep(x_acc[: args.samples]), y_acc[: args.samples], prep(x_acc), y_acc)
                results[name] = {**r, **info, "versions": versions}
            except Exception as exc:  # noqa: BLE001  (reported per path; the other one still runs)
                traceback.print_exc(file=sys.stderr)
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
