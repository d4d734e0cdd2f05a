"""Files the commands read and write: images given by the user, keys and ciphertexts."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gravel.cli.options import load_data
from gravel.errors import InputError

__all__ = ["load_image", "write_file"]


def write_file(path: str | Path, data: bytes) -> None:
    """Write through a temporary file, so an interrupted command leaves no half file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)


def load_image(args: argparse.Namespace) -> tuple[np.ndarray, int | None]:
    """`--image` (a .npy array, never unpickled, or an image file), else test image `--index`
    of `--data`; returns the image and its label where the data set has one."""
    if args.image:
        path = Path(args.image)
        if path.suffix == ".npy":
            try:
                return np.load(path, allow_pickle=False), None
            except (OSError, ValueError) as exc:
                raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
        try:
            from PIL import Image
        except ImportError as exc:
            raise InputError(f"{path}: reading image files needs Pillow (pip install pillow)") from exc
        try:
            return np.asarray(Image.open(path).convert("L"), dtype=np.uint8), None
        except OSError as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from exc
    data = load_data(args)
    if not 0 <= args.index < len(data.x_test):
        raise InputError(f"--index {args.index} outside the test set (0..{len(data.x_test) - 1})")
    return data.x_test[args.index], int(data.y_test[args.index])
