"""Data sets as float pixels in [0, 1] (the torchvision convention) and integer labels."""

from gravel.data.datasets import DATASETS, Dataset, load_dataset
from gravel.data.idx import read_idx

__all__ = ["DATASETS", "Dataset", "load_dataset", "read_idx"]
