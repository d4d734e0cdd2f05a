"""The data owner's commands: keygen, encrypt, decrypt (files), predict (through a server)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gravel.cli.files import load_image, write_file
from gravel.cli.options import add_data_options
from gravel.errors import InputError

__all__ = ["cmd_decrypt", "cmd_encrypt", "cmd_keygen", "cmd_predict", "register"]


def cmd_keygen(args: argparse.Namespace) -> None:
    from gravel.client.model import load_client_model

    client = load_client_model(args.artifact)  # TFHE or CKKS, from the manifest
    t = time.perf_counter()
    keys = client.keygen()
    ek = keys.evaluation_keys()
    keys.save(args.secret)
    write_file(args.eval_keys, ek)
    print(f"keys in {time.perf_counter() - t:.2f} s: secret -> {args.secret} (keep it private), "
          f"evaluation keys ({len(ek) / 1e6:.1f} MB) -> {args.eval_keys}")


def cmd_encrypt(args: argparse.Namespace) -> None:
    from gravel.client.model import load_client_model, load_secret_keys

    client = load_client_model(args.artifact)
    keys = load_secret_keys(args.secret, client)
    image, label = load_image(args)
    t = time.perf_counter()
    ct = client.encrypt(keys, image)
    write_file(args.out, ct)
    extra = f" (label {label})" if label is not None else ""
    print(f"encrypted{extra} in {time.perf_counter() - t:.3f} s: {len(ct)} bytes -> {args.out}")


def cmd_decrypt(args: argparse.Namespace) -> None:
    from gravel.client.model import load_client_model, load_secret_keys

    client = load_client_model(args.artifact)
    keys = load_secret_keys(args.secret, client)
    scores = np.asarray(client.decrypt(keys, Path(args.input).read_bytes()))
    if scores.ndim == 2:  # a CKKS output of a batch: every image's scores
        print(json.dumps({"predictions": [int(p) for p in scores.argmax(1)],
                          "scores": np.round(scores, 4).tolist()}))
        return
    print(json.dumps({"prediction": int(np.argmax(scores)), "scores": [round(float(s), 4) for s in scores]}))


def cmd_predict(args: argparse.Namespace) -> None:
    from gravel.client import Client

    if not args.images:
        raise InputError("name at least one image file (.npy, .png, ...)")
    images = []
    for name in args.images:
        args.image = name
        images.append(load_image(args)[0])
    with Client(args.server, cache_dir=args.cache_dir, progress=not args.quiet) as client:
        session = client.session(args.model)
        t = time.perf_counter()
        labels = [session.predict(x) for x in images] if len(images) == 1 else session.predict_batch(images)
        elapsed = time.perf_counter() - t
    for name, label in zip(args.images, labels):
        print(f"{name}\t{label}")
    print(f"{len(images)} encrypted predictions in {elapsed:.2f} s (session {session.id})", file=sys.stderr)


def register(subparsers: Any) -> None:
    """Add keygen, encrypt, decrypt and predict to the `gravel` parser."""
    p = subparsers.add_parser("keygen", help="client: generate keys for an artifact")
    p.add_argument("artifact")
    p.add_argument("--secret", required=True, help="file for the SECRET key set")
    p.add_argument("--eval-keys", required=True, help="file for the public evaluation keys")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser("encrypt", help="client: quantize and encrypt one image")
    p.add_argument("artifact")
    p.add_argument("--secret", required=True)
    p.add_argument("--image", help=".npy array or image file; or use --data/--index")
    add_data_options(p, required=False)
    p.add_argument("--index", type=int, default=0, help="test-set image index (with --data)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_encrypt)

    p = subparsers.add_parser("decrypt", help="client: decrypt and dequantize a prediction")
    p.add_argument("artifact")
    p.add_argument("--secret", required=True)
    p.add_argument("--input", required=True)
    p.set_defaults(func=cmd_decrypt)

    p = subparsers.add_parser("predict", help="client: encrypted prediction of image files through a server")
    p.add_argument("images", nargs="*", help=".npy arrays or image files (grey levels)")
    p.add_argument("--server", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", help="keys and sessions (default: GRAVEL_CACHE_DIR or ~/.cache/gravel)")
    p.set_defaults(func=cmd_predict)
