"""Which backend suits a model: TFHE (concrete) or CKKS, and why (`gravel check`).

TFHE is exact (every activation is a table lookup) and pays a programmable bootstrap per
neuron; CKKS evaluates linear layers and low-degree polynomials on thousands of packed values
at once, has no bootstrapping (the depth is a budget) and replaces non-polynomial activations
by fitted polynomials, which may cost accuracy. The advice weighs, for the batch size the user
expects: whether CKKS can run the model at all (depth, activations), the accuracy each keeps
against the float model, and the latency of each on this machine (TFHE: the measured
per-lookup cost; CKKS: one real encrypted image, and the batch path's cost model).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gravel.data import Dataset
from gravel.errors import GravelError

__all__ = ["backend_advice", "format_advice"]

ACCURACY_SLACK = 0.01  # CKKS may lose this much more than TFHE and still be advised


def _ckks(model: Any, data: Dataset, batch: int, calib: int, samples: int, measure: bool) -> dict[str, Any]:
    from gravel.ckks.compile import CkksOptions, compile_ckks
    from gravel.ckks.program import batch_cost
    from gravel.harness.common import calib_images, calib_labels

    try:
        compiled, _ = compile_ckks(model, calib_images(data, calib), calib_labels(data, calib),
                                   CkksOptions(batch_size=batch))
    except GravelError as exc:
        return {"supported": False, "reason": str(exc).splitlines()[0]}
    program = compiled.program
    x, y = data.x_test[:samples], np.asarray(data.y_test[:samples])
    params = program.params
    out: dict[str, Any] = {
        "supported": True, "depth": program.depth, "ring": params.poly_modulus_degree,
        "activations": compiled.report["activations"], "exact": compiled.report["exact"],
        "accuracy": float((program.simulate(x).argmax(1) == y).mean()), "block": program.block,
    }
    # the cost model's constants are for N=8192 with 6 data primes; an operation costs about
    # in proportion to the ring and the number of primes
    ring = params.poly_modulus_degree / 8192 * (len(params.coeff_mod_bit_sizes) - 1) / 6
    out["batch_s_estimate"] = round(batch_cost(program, params.slots, program.block, batch) * ring / 1000, 3)
    if measure:
        from gravel.ckks.client import CkksClient
        from gravel.ckks.server import CkksServer

        digest = b"\x00" * 32  # in memory only: client and server of the same program
        client = CkksClient(program.client_json(), digest)
        server = CkksServer(program, digest)
        client.keygen(("single",))
        keys = client.evaluation_keys()
        ctx = server.load_keys(keys, ("single",))
        blob = client.encrypt(x[:1], "single")
        t = time.perf_counter()
        server.run(ctx, blob)
        out["latency_s"] = round(time.perf_counter() - t, 3)
        out["eval_key_bytes"] = len(keys)
    return out


def backend_advice(model: Any, data: Dataset, tfhe: dict[str, Any], batch: int = 1, calib: int = 500,
                   samples: int = 500, measure: bool = True) -> dict[str, Any]:
    """Both backends side by side for batches of `batch` samples, and the one to use. `tfhe`:
    `check`'s result for the TFHE path (accuracies, lookups, latency estimate)."""
    float_acc = tfhe["accuracy_float"]
    tfhe_s = tfhe.get("latency_s") or tfhe.get("latency_estimate_s")
    concrete = {"accuracy": tfhe["accuracy_quantized"], "table_lookups": tfhe["table_lookups"],
                "latency_s": tfhe_s, "batch_s_estimate": round(tfhe_s * batch, 3) if tfhe_s else None}
    ckks = _ckks(model, data, batch, calib, samples, measure)
    if not ckks["supported"]:
        choice, why = "concrete", f"CKKS cannot run this model: {ckks['reason']}"
    else:
        ckks_s = ckks["batch_s_estimate"] if batch > 1 else ckks.get("latency_s", ckks["batch_s_estimate"])
        tfhe_total = concrete["batch_s_estimate"] if batch > 1 else tfhe_s
        loss_ckks, loss_tfhe = float_acc - ckks["accuracy"], float_acc - concrete["accuracy"]
        ckks["time_s"], concrete["time_s"] = ckks_s, tfhe_total
        faster = tfhe_total is None or ckks_s < tfhe_total
        what = f"{batch} samples" if batch > 1 else "one sample"
        if loss_ckks > loss_tfhe + ACCURACY_SLACK:
            choice = "concrete"
            why = (f"CKKS's polynomial activations cost {100 * loss_ckks:.1f} points of accuracy against "
                   f"{100 * loss_tfhe:.1f} for TFHE's exact lookups (fine-tune with --finetune, or use TFHE)")
        elif faster:
            choice = "ckks"
            why = (f"for {what} CKKS takes about {ckks_s:.2f} s against {tfhe_total:.2f} s for TFHE "
                   f"(depth {ckks['depth']}, {'exact polynomials' if ckks['exact'] else 'fitted polynomials'}, "
                   f"accuracy {100 * ckks['accuracy']:.1f} % vs {100 * concrete['accuracy']:.1f} %)")
        else:
            choice = "concrete"
            why = f"for {what} TFHE takes about {tfhe_total:.2f} s against {ckks_s:.2f} s for CKKS"
    return {"batch": batch, "accuracy_float": float_acc, "concrete": concrete, "ckks": ckks,
            "recommended": choice, "why": why}


def format_advice(a: dict[str, Any]) -> str:
    lines = [f"backend for batches of {a['batch']}: {a['recommended']} ({a['why']})"]
    c, k = a["concrete"], a["ckks"]
    lines.append(f"  concrete (TFHE): accuracy {100 * c['accuracy']:.1f} %, {c['table_lookups']} lookups, "
                 + (f"about {c['latency_s']:.2f} s per sample" if c.get("latency_s") else "latency unknown"))
    if k["supported"]:
        single = f", {k['latency_s']:.3f} s for one image (measured)" if "latency_s" in k else ""
        lines.append(f"  ckks: accuracy {100 * k['accuracy']:.1f} %, depth {k['depth']}, N={k['ring']}{single}, "
                     f"about {k['batch_s_estimate']:.2f} s for a batch of {a['batch']} (model)")
    else:
        lines.append(f"  ckks: not possible ({k['reason']})")
    return "\n".join(lines)
