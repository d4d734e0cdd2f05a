import gzip

import numpy as np
import pytest

from gravel.data import load_dataset, read_idx
from gravel.errors import DataError


def _write_idx(path, array, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", images)
    _write_idx(tmp_path / "b", images, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "b"), images)


def test_truncated_idx_names_file_and_sizes(tmp_path):
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t.gz", images, compress=False)
    raw = (tmp_path / "t.gz").read_bytes()
    (tmp_path / "t.gz").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"t\.gz: truncated or corrupt"):
        read_idx(tmp_path / "t.gz")


def test_not_idx_and_missing(tmp_path):
    (tmp_path / "x").write_bytes(b"hello world")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "x")
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "missing")


def test_digits_convention(digits):
    assert digits.x_train.dtype == np.float32 and digits.x_train.shape[1:] == (1, 8, 8)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert digits.y_test.dtype == np.int64 and set(np.unique(digits.y_test)) == set(range(10))
    assert len(digits.x_train) + len(digits.x_test) == 1797


def test_mnist_from_directory(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    data = load_dataset("mnist", root=tmp_path)
    assert data.x_test.shape == (5, 1, 28, 28) and data.x_train.shape == (7, 1, 28, 28)
    assert data.x_test.max() <= 1.0 and list(data.y_test) == [0, 1, 2, 3, 4]


def test_label_count_mismatch(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(DataError, match="expected 5 labels"):
        load_dataset("mnist", root=tmp_path)


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match="not found in"):
        load_dataset("fashion-mnist", root=tmp_path)
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("cifar")


def test_shared_mnist_test_set_if_present():
    try:
        data = load_dataset("mnist")
    except DataError:
        pytest.skip("../shared/datasets/mnist not beside this checkout")
    assert data.x_test.shape == (10000, 1, 28, 28)
    assert data.x_train.shape == (5000, 1, 28, 28)
