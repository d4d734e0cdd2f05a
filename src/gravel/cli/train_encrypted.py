"""`gravel train-encrypted`: logistic regression trained on encrypted data, against plaintext.

The data owner standardises its features (train statistics), encrypts features and labels, and
refreshes the weights between epochs; the compute party trains on ciphertexts. The same model
is trained in the clear on the same split, with the same polynomial sigmoid, learning rate and
epochs; both are scored on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gravel.errors import InputError

__all__ = ["DATASETS", "register", "run"]


@dataclass(frozen=True)
class _Recipe:
    """Owner-side preprocessing and the compute party's defaults for one data set."""

    loader: str
    divide: float  # standardised features are divided by this (keeps z in the sigmoid's range)
    lr: float
    sigmoid_range: float


DATASETS = {
    "breast-cancer": _Recipe("load_breast_cancer", 4.0, 2.0, 16.0),
    "digits": _Recipe("load_digits", 2.0, 8.0, 12.0),
}


def _split(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    recipe = DATASETS[name]
    data = getattr(sklearn.datasets, recipe.loader)()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.2,
                                              random_state=seed, stratify=data.target)
    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd[sd == 0] = 1.0
    return (x_tr - mu) / sd / recipe.divide, (x_te - mu) / sd / recipe.divide, y_tr, y_te


def run(data: str, epochs: int, *, lr: float | None = None, degree: int = 3, depth: int = 4,
        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train encrypted and in the clear; the figures as a dict (what --json prints)."""
    from gravel.tensor import approx
    from gravel.tensor.train import predict, train_encrypted, train_plaintext

    if data not in DATASETS:
        raise InputError(f"unknown data set {data!r}; choose one of {', '.join(DATASETS)}")
    if epochs < 1:
        raise InputError("--epochs must be at least 1")
    recipe = DATASETS[data]
    lr = recipe.lr if lr is None else lr
    sigmoid = approx.sigmoid(-recipe.sigmoid_range, recipe.sigmoid_range, degree)
    x_tr, x_te, y_tr, y_te = _split(data, seed)
    load_before = os.getloadavg()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc=f"encrypted training ({data})", unit="epoch")

    def tick(epoch: int, seconds: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch_s=f"{seconds:.2f}")

    t = time.perf_counter()
    result = train_encrypted(x_tr, y_tr, "logistic", epochs=epochs, lr=lr, sigmoid=sigmoid,
                             depth=depth, progress=tick)
    total = time.perf_counter() - t
    if bar is not None:
        bar.close()
    plain = train_plaintext(x_tr, y_tr, "logistic", epochs=epochs, lr=lr, sigmoid=sigmoid)
    acc_enc = float(np.mean(predict(result.weights, x_te, "logistic", result.classes) == y_te))
    acc_plain = float(np.mean(predict(plain, x_te, "logistic", result.classes) == y_te))
    return {
        "data": data,
        "task": "logistic" if len(result.classes) == 2 else "logistic one-vs-rest",
        "classes": len(result.classes),
        "samples_train": len(y_tr),
        "samples_test": len(y_te),
        "features": int(x_tr.shape[1]),
        "epochs": epochs,
        "lr": lr,
        "sigmoid": {"low": sigmoid.low, "high": sigmoid.high, "degree": sigmoid.degree,
                    "max_error": round(sigmoid.max_error, 4)},
        "accuracy_encrypted": acc_enc,
        "accuracy_plaintext": acc_plain,
        "accuracy_difference_points": round(100 * (acc_enc - acc_plain), 2),
        "max_weight_difference": float(np.max(np.abs(result.weights - plain))),
        "epoch_s": statistics.median(result.epoch_seconds),
        "epoch_s_all": [round(s, 3) for s in result.epoch_seconds],
        "compute_s": statistics.median(result.compute_seconds),
        "refresh_s": statistics.median(result.refresh_seconds),
        "refreshes": result.refreshes,
        "setup_s": round(result.setup_seconds, 3),
        "setup_bytes": result.setup_bytes,
        "refresh_bytes": result.refresh_bytes,
        "total_s": round(total, 3),
        "poly_modulus_degree": result.poly_modulus_degree,
        "depth": result.depth,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def _command(args: argparse.Namespace) -> None:
    out = run(args.data, args.epochs, lr=args.lr, degree=args.degree, depth=args.depth,
              seed=args.seed, progress=not getattr(args, "quiet", False))
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['data']}: {out['task']}, {out['samples_train']} training samples, "
          f"{out['features']} features, {out['epochs']} epochs")
    print(f"  test accuracy: encrypted {out['accuracy_encrypted']:.4f}, plaintext "
          f"{out['accuracy_plaintext']:.4f} ({out['accuracy_difference_points']:+.2f} points)")
    print(f"  {out['epoch_s']:.2f} s per epoch (median; compute {out['compute_s']:.2f} s, "
          f"refresh {out['refresh_s']:.2f} s), {out['refreshes']} weight refreshes, "
          f"setup {out['setup_s']:.1f} s and {out['setup_bytes'] / 1e6:.1f} MB, "
          f"N={out['poly_modulus_degree']} depth {out['depth']}")


def register(subparsers: Any) -> None:
    """Add `train-encrypted` to the gravel command line."""
    p = subparsers.add_parser(
        "train-encrypted",
        help="train logistic regression on encrypted features and labels; compare with plaintext",
    )
    p.add_argument("--data", required=True, choices=sorted(DATASETS),
                   help="breast-cancer (binary) or digits (one-vs-rest, 10 classes)")
    p.add_argument("--epochs", type=int, required=True, help="full-batch gradient steps")
    p.add_argument("--lr", type=float, help="learning rate (default: per data set)")
    p.add_argument("--degree", type=int, default=3, help="degree of the polynomial sigmoid (default 3)")
    p.add_argument("--depth", type=int, default=4,
                   help="CKKS depth (default 4: one epoch per weight refresh, N=8192)")
    p.add_argument("--seed", type=int, default=0, help="train/test split seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_command)
