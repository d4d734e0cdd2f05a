"""Logistic regression on encrypted features and labels vs plaintext training, both data sets.

    python benchmarks/train_encrypted.py [--epochs-cancer 20] [--epochs-digits 10]

The same as `gravel train-encrypted --data D --epochs E --json` for breast-cancer (binary) and
digits (one-vs-rest, 10 classes); prints ONE JSON line with both results (accuracies, median
epoch time, bytes exchanged, the machine's load average before and after).
"""

from __future__ import annotations

import argparse
import json

from gravel.cli.train_encrypted import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs-cancer", type=int, default=20)
    parser.add_argument("--epochs-digits", type=int, default=10)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    results = {
        "breast-cancer": run("breast-cancer", args.epochs_cancer, progress=args.progress),
        "digits": run("digits", args.epochs_digits, progress=args.progress),
    }
    for r in results.values():
        r.pop("epoch_s_all", None)
    print(json.dumps({"benchmark": "train_encrypted", **results}))


if __name__ == "__main__":
    main()
