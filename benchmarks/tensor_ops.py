"""Per-operation cost of gravel.tensor against TenSEAL's own tensor operations, same sizes, same
SEAL parameters (N=8192, depth 3, 2^32 scale), same power-of-two Galois keys.

    python benchmarks/tensor_ops.py [--repeats 5]

Prints a table on stderr and ONE JSON line on stdout (medians, seconds). Linear operations are
timed warm (their encoded diagonals cached, as in a loop or a model) and cold (built and encoded
in the call, as a one-off eager call; TenSEAL always encodes its plain operand in the call).
Encryption is outside the timings. The machine's load average is in the JSON: other work on a
shared machine inflates every figure alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import tenseal as ts
import torch

import gravel.tensor as gt


def median_time(fn: Callable[[], object], repeats: int, before: Callable[[], None] | None = None,
                warm_up: bool = True) -> float:
    if warm_up:
        fn()  # first allocations, and the cache a warm timing is about
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    r = args.repeats
    load_before = os.getloadavg()

    def pair(**kw: int) -> tuple[gt.Context, ts.Context]:
        g = gt.Context(depth=3, **kw)
        t = g.keys.tenseal.copy()  # the same secret key and SEAL parameters
        t.generate_galois_keys()
        t.global_scale = 2.0 ** g.params.scale_bits
        return g, t

    ctx, tctx = pair()
    # TenSEAL's im2col convolution of a 28x28 image with a 3x3 kernel packs 676 windows (padded
    # to 1024) x 9 values in one ciphertext: it needs N=32768. Both sides run it there; gravel
    # also at N=8192, where its 28x28 image fits.
    ctx16, tctx16 = pair(min_slots=16384)

    rng = np.random.default_rng(0)
    a64 = rng.uniform(-1, 1, (64, 64))
    b64 = rng.uniform(-1, 1, (64, 64))
    w64 = rng.uniform(-1, 1, (64, 64)) / 8
    v64 = rng.uniform(-1, 1, 64)
    img = rng.uniform(0, 1, (28, 28))
    kernel = rng.uniform(-1, 1, (3, 3)) / 3
    coeffs = [0.5, 0.197, 0.0, -0.004]

    ga, gb = ctx.encrypt(torch.tensor(a64)), ctx.encrypt(torch.tensor(b64))
    gv = ctx.encrypt(torch.tensor(v64))
    gimg = ctx.encrypt(torch.tensor(img[None]))
    gimg16 = ctx16.encrypt(torch.tensor(img[None]))
    ta, tb = ts.ckks_vector(tctx, a64.ravel().tolist()), ts.ckks_vector(tctx, b64.ravel().tolist())
    tv = ts.ckks_vector(tctx, v64.tolist())
    tbatch = ts.ckks_tensor(tctx, ts.plain_tensor(a64), batch=True).reshape([1, 64])  # SIMD: rows
    timg, windows = ts.im2col_encoding(tctx16, img.tolist(), 3, 3, 1)
    tkernel = kernel.tolist()

    def cold() -> None:
        ctx._maps.clear()
        ctx16._maps.clear()

    rows = []

    def row(name: str, size: str, g_fn, t_fn, t_name: str, linear: bool = False, n: int = 8192,
            slow_tenseal: bool = False) -> None:
        entry = {"op": name, "size": size, "poly_modulus_degree": n, "tenseal_op": t_name,
                 "gravel_s": median_time(g_fn, r)}
        if linear:
            entry["gravel_cold_s"] = median_time(g_fn, r, before=cold)
        entry["tenseal_s"] = (median_time(t_fn, 1, warm_up=False) if slow_tenseal
                              else median_time(t_fn, r))
        rows.append(entry)

    row("add", "64x64 + 64x64", lambda: ga + gb, lambda: ta + tb, "CKKSVector +")
    row("multiply", "64x64 * 64x64", lambda: ga * gb, lambda: ta * tb, "CKKSVector *")
    row("matmul", "vector 64 @ plain 64x64", lambda: gv @ w64, lambda: tv.mm(w64.tolist()),
        "CKKSVector.mm", linear=True)
    trows = [ts.ckks_vector(tctx, row_.tolist()) for row_ in a64]
    row("matmul", "64x64 @ plain 64x64", lambda: ga @ w64, lambda: [t.mm(w64.tolist()) for t in trows],
        "64 x CKKSVector.mm (one per row)", linear=True, slow_tenseal=True)
    row("matmul", "64x64 @ plain 64x64", lambda: ga @ w64, lambda: tbatch.mm(w64.tolist()),
        "CKKSTensor(batch=True).mm (SIMD across rows)", linear=True, slow_tenseal=True)
    row("conv2d", "28x28, 3x3 kernel", lambda: gt.conv2d(gimg16, kernel[None, None]),
        lambda: timg.conv2d_im2col(tkernel, windows), "CKKSVector.conv2d_im2col (im2col-encoded input)",
        linear=True, n=32768)
    rows.append({"op": "conv2d", "size": "28x28, 3x3 kernel", "poly_modulus_degree": 8192,
                 "tenseal_op": "(does not fit N=8192)",
                 "gravel_s": median_time(lambda: gt.conv2d(gimg, kernel[None, None]), r),
                 "gravel_cold_s": median_time(lambda: gt.conv2d(gimg, kernel[None, None]), r, before=cold),
                 "tenseal_s": None})
    row("polynomial", "degree 3 on 4096 values", lambda: ga.polyval(coeffs), lambda: ta.polyval(coeffs),
        "CKKSVector.polyval")

    # the results agree (a check that both sides computed the same thing)
    checks = {
        "matmul_vec": float(np.abs((gv @ w64).decrypt().numpy() - np.array(tv.mm(w64.tolist()).decrypt())).max()),
        "matmul_64x64": float(np.abs((ga @ w64).decrypt().numpy()
                                     - np.array([t.mm(w64.tolist()).decrypt() for t in trows])).max()),
        "conv2d": float(np.abs(gt.conv2d(gimg16, kernel[None, None]).decrypt().numpy().ravel()
                               - np.array(timg.conv2d_im2col(tkernel, windows).decrypt())).max()),
        "polynomial": float(np.abs(ga.polyval(coeffs).decrypt().numpy().ravel()
                                   - np.array(ta.polyval(coeffs).decrypt())).max()),
    }
    print(f"{'op':<11}{'size':<26}{'N':>6}{'gravel s':>10}{'cold s':>9}{'TenSEAL s':>11}  TenSEAL op",
          file=sys.stderr)
    for e in rows:
        cold_s = f"{e['gravel_cold_s']:.4f}" if "gravel_cold_s" in e else "-"
        ten = f"{e['tenseal_s']:.4f}" if e["tenseal_s"] is not None else "-"
        print(f"{e['op']:<11}{e['size']:<26}{e['poly_modulus_degree']:>6}{e['gravel_s']:>10.4f}{cold_s:>9}"
              f"{ten:>11}  {e['tenseal_op']}", file=sys.stderr)
    p = ctx.params
    print(json.dumps({
        "benchmark": "tensor_ops",
        "params": {"poly_modulus_degree": p.poly_modulus_degree, "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes),
                   "scale_bits": p.scale_bits},
        "repeats": r,
        "ops": rows,
        "max_abs_difference_gravel_vs_tenseal": checks,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
