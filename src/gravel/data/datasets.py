"""The data sets Gravel trains, calibrates and benchmarks on.

Every loader returns float32 pixels in [0, 1] shaped (N, 1, H, W) and int64 labels, so that
models, calibration and client-side quantization see one convention whatever the source.
"""

from __future__ import annotations

import gzip
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gravel.data.idx import read_idx
from gravel.errors import DataError

__all__ = ["DATASETS", "Dataset", "load_dataset"]

_REPO_SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "datasets"
_FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
_CACHE = Path(os.environ.get("GRAVEL_CACHE", Path.home() / ".cache" / "gravel"))

_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class Dataset:
    """Train and test splits of one data set; pixels float32 in [0, 1], shape (N, 1, H, W)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = 10

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_test.shape[1:])


def _images(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim != 3:
        raise DataError(f"{path}: expected an image file (3 dimensions), found shape {raw.shape}")
    return (raw.astype(np.float32) / 255.0)[:, None, :, :]


def _labels(raw: np.ndarray, path: Path, n: int) -> np.ndarray:
    if raw.ndim != 1 or len(raw) != n:
        raise DataError(f"{path}: expected {n} labels, found shape {raw.shape}")
    return raw.astype(np.int64)


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / name.removesuffix(".gz")):
            if candidate.is_file():
                return candidate
    return None


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            out.write(response.read())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {exc}") from exc
    tmp.replace(dest)


def _idx_split(dirs: list[Path], key_x: str, key_y: str, what: str, hint: str) -> tuple:
    px, py = _find(_IDX_FILES[key_x], dirs), _find(_IDX_FILES[key_y], dirs)
    if px is None or py is None:
        missing = _IDX_FILES[key_x] if px is None else _IDX_FILES[key_y]
        searched = ", ".join(str(d) for d in dirs)
        raise DataError(f"{what}: {missing} not found in {searched}. {hint}")
    x = _images(read_idx(px), px)
    return x, _labels(read_idx(py), py, len(x))


def _dirs(env: str, defaults: list[Path], root: str | Path | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    dirs = [Path(os.environ[env])] if os.environ.get(env) else []
    return dirs + defaults


def load_mnist(root: str | Path | None = None, download: bool = False) -> Dataset:
    """MNIST: the official test set, and the full training set where present.

    Without the 60k training IDX files, the 5,000-image CSV subset in shared/datasets/mnist is
    used for training (the full set is not on these machines).
    """
    dirs = _dirs("GRAVEL_MNIST_DIR", [_REPO_SHARED / "mnist", _CACHE / "mnist"], root)
    hint = "Set GRAVEL_MNIST_DIR, pass --data-dir, or use --download on a machine that is online."
    if download and _find(_IDX_FILES["test_x"], dirs) is None:
        for name in _IDX_FILES.values():
            _download(_MNIST_URL + name, _CACHE / "mnist" / name)
        dirs.append(_CACHE / "mnist")
    x_test, y_test = _idx_split(dirs, "test_x", "test_y", "MNIST", hint)
    if _find(_IDX_FILES["train_x"], dirs) is not None:
        x_train, y_train = _idx_split(dirs, "train_x", "train_y", "MNIST", hint)
    else:
        csv = _find("train-5k.csv.gz", dirs)
        if csv is None:
            raise DataError(f"MNIST: no training images (IDX or train-5k.csv.gz) found. {hint}")
        x_train, y_train = _read_pixel_csv(csv)
    return Dataset("mnist", x_train, y_train, x_test, y_test)


def _read_pixel_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One image a row: 784 pixel values 0-255, then the label."""
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot parse as pixel CSV ({exc})") from exc
    if rows.shape[1] != 785:
        raise DataError(f"{path}: expected 785 columns (784 pixels + label), found {rows.shape[1]}")
    pixels = rows[:, :784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values outside 0-255")
    return (pixels / 255.0).reshape(-1, 1, 28, 28), rows[:, 784].astype(np.int64)


def load_fashion_mnist(root: str | Path | None = None, download: bool = False) -> Dataset:
    """Fashion-MNIST, 60k/10k, from Debian's dataset-fashion-mnist package by default."""
    dirs = _dirs("GRAVEL_FASHION_DIR", [_FASHION_DEBIAN, _CACHE / "fashion-mnist"], root)
    if download and _find(_IDX_FILES["test_x"], dirs) is None:
        for name in _IDX_FILES.values():
            _download(_FASHION_URL + name, _CACHE / "fashion-mnist" / name)
        dirs.append(_CACHE / "fashion-mnist")
    hint = "Install it with `apt-get install dataset-fashion-mnist` or pass --data-dir."
    x_train, y_train = _idx_split(dirs, "train_x", "train_y", "Fashion-MNIST", hint)
    x_test, y_test = _idx_split(dirs, "test_x", "test_y", "Fashion-MNIST", hint)
    return Dataset("fashion-mnist", x_train, y_train, x_test, y_test)


def load_digits(root: str | Path | None = None, download: bool = False) -> Dataset:
    """scikit-learn's 8x8 digits (ships with the package); a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    tr, te = order[:cut], order[cut:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te])


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
}


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    """Load a data set by name: one of `digits`, `mnist`, `fashion-mnist`."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](root=root, download=download)
