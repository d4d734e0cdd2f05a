"""Shared by check and bench: get an artifact for a checkpoint, ONNX file or artifact path."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from gravel.compiler import QuantConfig, compile_model
from gravel.data import Dataset
from gravel.protocol import Manifest, load_manifest


def ensure_artifact(
    model: str | Path, data: Dataset, calib: int = 500, config: QuantConfig = QuantConfig(), **kwargs
) -> tuple[Manifest, tempfile.TemporaryDirectory | None]:
    """An artifact path is used as is; a model is compiled into a temporary directory."""
    path = Path(model)
    if (path / "manifest.json").is_file():
        return load_manifest(path, role="all"), None
    tmp = tempfile.TemporaryDirectory(prefix="gravel-")
    manifest = compile_model(path, calib_images(data, calib), Path(tmp.name) / "model.gravel", config,
                             calib_y=calib_labels(data, calib), **kwargs)
    return manifest, tmp


def _calib_order(data: Dataset, n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).permutation(len(data.x_train))[:n])


def calib_images(data: Dataset, n: int) -> np.ndarray:
    """A fixed, class-mixed sample of training images (some sets are sorted by label)."""
    return data.x_train[_calib_order(data, n)]


def calib_labels(data: Dataset, n: int) -> np.ndarray:
    """The labels of `calib_images(data, n)`: they let post-training quantization judge by accuracy."""
    return data.y_train[_calib_order(data, n)]
