"""The input contract: how a client turns a float array into the integers it encrypts.

One class both writes this rule (the compiler, into the manifest) and applies it (the client,
the CLI, the SDK, the harness), so the two sides cannot drift apart:

    q = clip(floor((x - lo) / step + 0.5), qmin, qmax)     (qmin..qmax within 0..2^bits - 1)

`shape` is the model's declared per-sample input shape. Data with the same number of elements
in another layout (a 28x28 image for a [784] model) is reshaped, the same way everywhere; any
other shape is an error naming both. uint8 data is read as 0..255 grey levels scaled to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gravel.errors import InputError

__all__ = ["InputQuantizer", "conform"]


def conform(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    """One sample as float64 of exactly `shape`, or an InputError naming both shapes."""
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    elif arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"input dtype {arr.dtype}: expected floats (or uint8 grey levels 0-255)")
    arr = arr.astype(np.float64)
    if arr.shape != tuple(shape):
        if arr.size != math.prod(shape):
            raise InputError(
                f"input of shape {arr.shape} ({arr.size} values): this model expects "
                f"{tuple(shape)} ({math.prod(shape)} values), its declared input"
            )
        arr = arr.reshape(shape)
    if not np.all(np.isfinite(arr)):
        raise InputError("input contains NaN or infinite values")
    return arr


@dataclass(frozen=True)
class InputQuantizer:
    """Uniform quantization of the model input on `bits` bits over [lo, lo + step * (2^bits - 1)]."""

    shape: tuple[int, ...]
    bits: int
    lo: float
    step: float
    qmin: int = 0  # the levels the model was calibrated on; inputs are clipped to them
    qmax: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16 or not self.step > 0 or not math.isfinite(self.lo):
            raise InputError(f"invalid input quantization: bits={self.bits}, lo={self.lo}, step={self.step}")

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def hi(self) -> float:
        return self.lo + self.step * self.levels

    @staticmethod
    def over_range(shape: tuple[int, ...], bits: int, lo: float, hi: float) -> InputQuantizer:
        """The quantizer spanning [lo, hi] (a constant input gets a unit step)."""
        levels = 2**bits - 1
        step = (hi - lo) / levels if hi > lo else 1.0
        return InputQuantizer(tuple(int(d) for d in shape), int(bits), float(lo), float(step))

    def quantize(self, x: Any) -> np.ndarray:
        """One sample (validated and conformed to the declared shape) -> int64 levels.

        Values a little outside the calibrated range are clipped; values far outside it
        (more than the range's width beyond it, such as 0-255 pixels for a [0, 1] model) are
        refused, since clipping them would silently give a meaningless prediction."""
        arr = conform(x, self.shape)
        width = self.hi - self.lo
        if arr.min() < self.lo - width or arr.max() > self.hi + width:
            raise InputError(
                f"input values span [{arr.min():.3g}, {arr.max():.3g}], far outside the range the model "
                f"was calibrated on [{self.lo:.3g}, {self.hi:.3g}]; scale the input as in training"
            )
        return self._levels(arr)

    def quantize_batch(self, x: np.ndarray) -> np.ndarray:
        """A batch (N, *shape), already validated by the caller, -> int64 levels."""
        x = np.asarray(x, dtype=np.float64)
        return self._levels(x.reshape((len(x),) + self.shape))

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, dtype=np.float64) * self.step + self.lo

    def _levels(self, x: np.ndarray) -> np.ndarray:
        q = np.floor((x - self.lo) / self.step + 0.5)
        return np.clip(q, self.qmin, self.levels if self.qmax is None else self.qmax).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "bits": self.bits, "lo": self.lo, "step": self.step, "qmin": self.qmin,
                "qmax": self.levels if self.qmax is None else self.qmax, "dtype": "float32"}

    @staticmethod
    def from_json(data: dict[str, Any]) -> InputQuantizer:
        try:
            if "lo" not in data:  # format 1 manifests: images in [0, 1]
                return InputQuantizer.over_range(tuple(data["shape"]), int(data["bits"]), 0.0, 1.0)
            return InputQuantizer(tuple(int(d) for d in data["shape"]), int(data["bits"]), float(data["lo"]),
                                  float(data["step"]), int(data.get("qmin", 0)), data.get("qmax"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the manifest's input quantization is malformed ({exc})") from exc
