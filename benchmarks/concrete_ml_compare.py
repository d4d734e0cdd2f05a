"""Issue 8's side-by-side: Gravel against Concrete ML 1.9 on the same MNIST images.

    .venv/bin/python benchmarks/concrete_ml_compare.py --samples 100   # the measurement
    .venv/bin/python benchmarks/concrete_ml_compare.py --samples 3     # a check that all paths run

Runs in Gravel's `.venv`. Concrete ML pins concrete-python 2.10, torch 2.3.1 and numpy 1.26, so
it lives in its own environment, `.venv-cml/`, made (once) by `concrete_ml_setup.sh`; its part
runs as a subprocess (`concrete_ml_inner.py`) that prints one JSON line. Both sides get:

- the reference 784-128-64-10 MLP of `import_models.py` (normalisation inside the model), trained
  in plain PyTorch on the 5k MNIST training subset and cached as `runs/mlp.pt` (shared with
  `import_models.py`, same recipe);
- the same 500 calibration images (`gravel.harness.common.calib_images`) and the same first N
  MNIST test images, handed to Concrete ML as an `.npz` of plain arrays (no pickle).

Paths: `gravel_ptq` (the float model's ONNX export compiled by Gravel at default settings, one
process, `gravel.harness.bench`), `gravel_finetuned` (the same export compiled at 3-bit
activations and 4-bit lookups, `--a-bits 3 --tlu-bits 4`, then fine-tuned 3 epochs with that
quantization in place on the 5k MNIST training subset, `--finetune 3`: what `gravel compile`
does with those options, on the data Concrete ML's QAT recipe trains on), `cml_qat` (Concrete ML's QAT recipe: a Brevitas 3-bit
weights/activations 784-128-64-10 net through `compile_brevitas_qat_model`) and `cml_ptq`
(`compile_torch_model(float model, calib, n_bits=6)`); `concrete_ml_inner.py` says which
Concrete ML settings are used (accumulator rounding, client-side normalisation) and why. By
default Concrete ML gets Gravel's per-lookup error probability (p_error 0.01) rather than its
own far stricter 2**-40, which made it 3-6x slower in a check here (`--cml-p-error concrete`).
Both sides run with the same glibc tunables (huge pages, `gravel/tuning.py`; the script restarts
itself with them and the Concrete ML child inherits them). Latency is the median over images of the server-side evaluation of one encrypted image
(Gravel's `ServerModel.run`, Concrete's `Circuit.run`), one image per call; key generation,
encryption and decryption are timed apart.

Prints ONE JSON line: per path latency_s, accuracy_encrypted, samples, eval_key_bytes, and
`ratio_gravel_best_to_cml_best` (Gravel's best latency over Concrete ML's best), with the CPU
count and load average at start and end. A path that fails records its error and the others
still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = ROOT / "runs"
CML_VENV = ROOT / ".venv-cml"
SETUP = HERE / "concrete_ml_setup.sh"
INNER = HERE / "concrete_ml_inner.py"

# Same recipe as `import_models.py mlp`, which shares the cached weights runs/mlp.pt.
MLP_EPOCHS, MLP_LR = 30, 2e-3
CALIB_IMAGES = 500
CLEAR_ACC_IMAGES = 2000
PATHS = ("gravel_ptq", "gravel_finetuned", "cml_qat", "cml_ptq")
# gravel_finetuned: the widths given (the rest as the search starts) and the fine-tuning epochs
FINETUNED_WIDTHS = {"in_bits": 3, "w_bits": 5, "a_bits": 3, "tlu_bits": 4}
FINETUNE_EPOCHS = 3


def _log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def _load() -> tuple[float, float, float]:
    return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]


def install_cml() -> float:
    """Make `.venv-cml` (idempotent); returns the seconds it took (about 0 when already there)."""
    t = time.perf_counter()
    done = subprocess.run(["bash", str(SETUP)], check=False, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(
            f"{tail}\ninstalling Concrete ML into {CML_VENV} failed (exit {done.returncode}); "
            f"see the lines above or run `bash {SETUP.relative_to(ROOT)}`; --skip-install uses "
            "an existing environment as it is"
        )
    _log(done.stdout.strip())
    return time.perf_counter() - t


def reference_mlp(data: Any) -> tuple[Any, float]:
    """The float reference MLP, trained once and cached in runs/mlp.pt; float accuracy on 2000."""
    import torch
    from import_models import ReferenceMLP, train

    model = ReferenceMLP()
    weights = RUNS / "mlp.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
    else:
        _log(f"training the reference MLP ({MLP_EPOCHS} epochs) -> {weights}")
        train(model, data.x_train, data.y_train, epochs=MLP_EPOCHS, lr=MLP_LR)
        torch.save(model.state_dict(), weights)
    with torch.no_grad():
        x = torch.from_numpy(data.x_test[:CLEAR_ACC_IMAGES]).float()
        acc = float((model(x).argmax(1).numpy() == data.y_test[:CLEAR_ACC_IMAGES]).mean())
    return model, acc


def export_for_cml(model: Any, data: Any, calib: np.ndarray, path: Path) -> None:
    """Weights, calibration, training and test arrays as one plain .npz (read with allow_pickle=False)."""
    arrays = {f"w:{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    n = CLEAR_ACC_IMAGES
    np.savez(
        path,
        x_train=data.x_train.astype(np.float32), y_train=data.y_train.astype(np.int64),
        x_test=data.x_test[:n].astype(np.float32), y_test=data.y_test[:n].astype(np.int64),
        calib=calib.astype(np.float32), **arrays,
    )


def run_gravel(onnx_path: Path, data: Any, calib: np.ndarray, calib_y: np.ndarray,
               samples: int, finetuned: bool = False) -> dict[str, Any]:
    """One of Gravel's paths in one process (max_shards=1), labelled calibration as `gravel
    compile --data` does: default settings, or (`finetuned`) the fixed widths fine-tuned on
    the training set; plus the simulated program's accuracy on the 2000 test images (concrete's
    simulation draws lookup errors at the compiled p_error), a steadier figure than 100
    encrypted images, where one image is a point."""
    from gravel.compiler import Finetune, QuantConfig, build, compile_model, load_graph, partition
    from gravel.harness.bench import bench
    from gravel.harness.check import simulate, simulation_model

    config = QuantConfig(**FINETUNED_WIDTHS, search=False) if finetuned else QuantConfig()
    tune = Finetune(data.x_train, data.y_train, FINETUNE_EPOCHS) if finetuned else None
    art = RUNS / ("compare-mlp-finetuned.gravel" if finetuned else "compare-mlp.gravel")
    t = time.perf_counter()
    manifest = compile_model(onnx_path, calib, art, config, max_shards=1, overwrite=True, calib_y=calib_y,
                             finetune=tune)
    compile_s = time.perf_counter() - t
    x, y = data.x_test[:CLEAR_ACC_IMAGES], data.y_test[:CLEAR_ACC_IMAGES]
    graph = load_graph(manifest)
    acc_q = float((graph.predict(x) == y).mean())
    p_error = manifest.data["backend"]["p_error"]
    # the artifact's own integer program (fine-tuned weights included), simulated
    compiled = build(onnx_path, calib, config, 1, calib_y)
    compiled.qgraph, compiled.stages = graph, partition(graph)
    one, module = simulation_model(compiled, calib, p_error)
    acc_sim = float((simulate(module, one, x) == y).mean())
    r = bench(art, data, samples=samples, progress=False)
    keep = ("latency_s", "accuracy_encrypted", "accuracy_clear", "agreement", "samples",
            "eval_key_bytes", "input_ct_bytes", "keygen_s", "encrypt_s", "decrypt_s", "pbs_count")
    out = {k: r[k] for k in keep}
    out.update({"accuracy_quantized_2000": acc_q, "accuracy_simulated_2000": acc_sim,
                "compile_s": round(compile_s, 1), "p_error": p_error, **fused_cost(art),
                "widths": {k: getattr(config, k) for k in FINETUNED_WIDTHS} if finetuned else "searched",
                "finetune": manifest.data["model"].get("finetune")})
    return out


def fused_cost(art: Path) -> dict[str, Any]:
    """Bootstrap parameters of the artifact's whole-network function, as Concrete ML's side
    reports them: which parameters the lookups got explains latency on a busy machine."""
    from concrete import fhe

    from gravel.compiler.program import FUSED

    server = fhe.Server.load(art / "server.zip")
    return {"pbs_params": {str(k): v for k, v in server.programmable_bootstrap_count_per_parameter(FUSED).items()}}


def run_cml(npz: Path, samples: int, paths: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Concrete ML's paths in `.venv-cml`; its stderr (progress) passes through."""
    cmd = [str(CML_VENV / "bin" / "python"), str(INNER), "--data", str(npz),
           "--samples", str(samples), "--paths", ",".join(paths),
           "--qat-epochs", str(args.qat_epochs), "--runs", str(RUNS)]
    cmd += ["--rounding", args.cml_rounding, "--norm", args.cml_norm]
    if args.cml_p_error != "concrete":
        cmd += ["--p-error", str(args.cml_p_error)]
    done = subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        err = f"Concrete ML subprocess exited {done.returncode} without a result (see stderr above)"
        return {p: {"error": err} for p in paths}
    return json.loads(lines[-1])


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Gravel's best latency over Concrete ML's best (lower is better for Gravel), with accuracies."""

    def best(prefix: str) -> str | None:
        ok = [p for p, r in results.items() if p.startswith(prefix) and "latency_s" in r]
        return min(ok, key=lambda p: results[p]["latency_s"]) if ok else None

    g, c = best("gravel"), best("cml")
    out: dict[str, Any] = {"gravel_best_path": g, "cml_best_path": c}
    if g and c:
        out["ratio_gravel_best_to_cml_best"] = round(results[g]["latency_s"] / results[c]["latency_s"], 3)
        out["accuracy_gravel_best_minus_cml_best"] = round(
            results[g]["accuracy_encrypted"] - results[c]["accuracy_encrypted"], 4)
        if "accuracy_simulated_2000" in results[g] and "accuracy_simulated_2000" in results[c]:
            out["simulated_2000_gravel_best_minus_cml_best"] = round(
                results[g]["accuracy_simulated_2000"] - results[c]["accuracy_simulated_2000"], 4)
    return out


def main() -> None:
    from gravel.tuning import reexec_with_huge_pages

    reexec_with_huge_pages()  # both sides alike: Gravel in this process, Concrete ML in a child
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100, help="encrypted test images per path")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    ap.add_argument("--skip-install", action="store_true", help="use .venv-cml as it is")
    ap.add_argument("--qat-epochs", type=int, default=20, help="epochs of Brevitas QAT training")
    ap.add_argument("--cml-rounding", default="6:approximate",
                    help="Concrete ML rounding_threshold_bits for both its paths: none, BITS or "
                         "BITS:exact|approximate (6 bits do not compile without it)")
    ap.add_argument("--cml-p-error", default="gravel",
                    help="Concrete ML p_error per table lookup for both its paths: `gravel` (the "
                         "same as Gravel's default, 0.01), `concrete` (its own default, 2**-40) "
                         "or a number")
    ap.add_argument("--cml-norm", choices=["client", "graph"], default="client",
                    help="Concrete ML post-training path: input normalisation on the client "
                         "(its faster form) or inside the model as exported")
    args = ap.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        ap.error(f"--paths: unknown {unknown or 'empty list'}; choose from {', '.join(PATHS)}")
    if not 1 <= args.samples <= CLEAR_ACC_IMAGES:
        ap.error(f"--samples must be between 1 and {CLEAR_ACC_IMAGES}, got {args.samples}")
    if args.qat_epochs < 1:
        ap.error(f"--qat-epochs must be at least 1, got {args.qat_epochs}")
    if args.cml_p_error == "gravel":
        from gravel.compiler import DEFAULT_P_ERROR

        args.cml_p_error = DEFAULT_P_ERROR
    elif args.cml_p_error != "concrete":
        try:
            args.cml_p_error = float(args.cml_p_error)
        except ValueError:
            ap.error(f"--cml-p-error: expected gravel, concrete or a number, got {args.cml_p_error!r}")
        if not 0 < args.cml_p_error < 1:
            ap.error(f"--cml-p-error must be between 0 and 1, got {args.cml_p_error}")

    load_start, t_start = _load(), time.perf_counter()
    cml_paths = [p.removeprefix("cml_") for p in paths if p.startswith("cml_")]
    install_s = None
    if cml_paths and not args.skip_install:
        install_s = install_cml()
    elif cml_paths and not (CML_VENV / "bin" / "python").exists():
        raise SystemExit(f"--skip-install given but {CML_VENV} does not exist; drop --skip-install")

    sys.path.insert(0, str(HERE))
    import torch
    from import_models import export

    from gravel.data import load_dataset
    from gravel.harness.common import calib_images, calib_labels

    data = load_dataset("mnist")
    RUNS.mkdir(exist_ok=True)
    model, acc_float = reference_mlp(data)
    calib = calib_images(data, CALIB_IMAGES)
    calib_y = calib_labels(data, CALIB_IMAGES)
    results: dict[str, dict[str, Any]] = {}

    gravel_paths = [p for p in paths if p.startswith("gravel_")]
    if gravel_paths:
        onnx_path = RUNS / "compare-mlp.onnx"  # exported each run: exactly the weights CML gets
        with contextlib.redirect_stdout(sys.stderr):  # the exporter talks; stdout is for the JSON
            export(model, torch.from_numpy(data.x_test[:1]).float(), onnx_path, "dynamo")
    for path in gravel_paths:
        _log(f"{path}: compile {onnx_path.name} and run {args.samples} encrypted images")
        try:
            results[path] = run_gravel(onnx_path, data, calib, calib_y, args.samples,
                                       finetuned=path == "gravel_finetuned")
        except Exception as exc:  # noqa: BLE001  (a failing path is reported, the others still run)
            traceback.print_exc(file=sys.stderr)
            results[path] = {"error": f"{type(exc).__name__}: {exc}"}

    if cml_paths:
        npz = RUNS / "compare-mnist.npz"
        export_for_cml(model, data, calib, npz)
        _log(f"Concrete ML ({', '.join(cml_paths)}) in {CML_VENV.name}")
        for name, r in run_cml(npz, args.samples, cml_paths, args).items():
            results[f"cml_{name}"] = r

    line = {
        "benchmark": "concrete-ml-compare",
        "model": "reference MLP 784-128-64-10 (normalisation inside)",
        "dataset": "mnist",
        "samples": args.samples,
        "accuracy_float_2000": acc_float,
        **{p: results[p] for p in paths},
        **summarise(results),
        "cml_install_s": None if install_s is None else round(install_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "cpus": os.cpu_count(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "load_avg_start": load_start,
        "load_avg_end": _load(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
