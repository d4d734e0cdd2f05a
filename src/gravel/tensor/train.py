"""Logistic and linear regression trained on encrypted data by a party that cannot decrypt it.

Two parties, two objects, and only bytes between them:

- the **data owner** (`DataOwner`) holds the data and the secret key. It encrypts its features
  and labels once and sends them with the public context (`setup()`); between epochs it
  decrypts the current *weights* and sends them back freshly encrypted (`refresh()`): CKKS has
  no bootstrapping here, so the weights' depth runs out; the owner never decrypts data, only
  the weight ciphertexts the compute party sends.
- the **compute party** (`ComputeParty`) holds the public context and ciphertexts only. It runs
  full-batch gradient descent: one epoch is one step over all samples,

      z = X w,   p = poly_sigmoid(z),   w <- w - (lr / n) X^T (p - y)

  (linear regression: p = z), one model per class for one-vs-rest.

Packing (SIMD across samples): feature j of all samples fills one block of B >= n slots (B a
power of two), slots/B features per ciphertext; a weight is replicated over its feature's block.
Then X*w is one slot-wise product per ciphertext, summed over ciphertexts with one
relinearisation; a rotate-and-sum across blocks (log2(slots/B) rotations) leaves z for every
sample in every block; the polynomial runs on all samples at once; the gradient of feature j is a
rotate-and-sum inside its block (log2 B rotations). lr/n is folded into the polynomial's
coefficients and the labels, so a logistic step costs 1 + 2 + 1 = 4 levels (degree-3 sigmoid):
a depth-4 context (N=8192, fast) does one step per refresh. Where the depth allows more, the
compute party keeps the weights itself (one more level to re-replicate them) and asks for a
refresh only when they run out.

What each side sees (the threat model, in words): the compute party sees the public context and
ciphertexts, never a value; it learns the sizes: number of samples (to the block size), features,
classes, and the number of epochs. The data owner sees the weights after every refresh (its own
model; the slots beside each weight hold sums of its own data). Nobody else sees anything. A
compute party that deviates from the protocol can make the model wrong, not learn the data.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gravel.ckks.ciphertext import Ciphertext
from gravel.ckks.evaluator import polyval_depth
from gravel.errors import BlobFormatError, DepthError, InputError, KeyMismatchError
from gravel.tensor import approx as _approx
from gravel.tensor.context import Context, PublicContext
from gravel.tensor.tensor import EncryptedTensor

__all__ = [
    "ComputeParty",
    "DataOwner",
    "TrainResult",
    "predict",
    "train_encrypted",
    "train_plaintext",
]

_FORMAT = 1
_U32 = struct.Struct("<I")
TASKS = ("logistic", "linear")


# -- messages: a JSON header and named parts (each a framed Gravel blob) ------------------------
def _pack(kind: str, meta: dict[str, Any], parts: dict[str, bytes]) -> bytes:
    head = json.dumps({"format": _FORMAT, "kind": kind, "meta": meta,
                       "parts": [[k, len(v)] for k, v in parts.items()]}, sort_keys=True).encode()
    return _U32.pack(len(head)) + head + b"".join(parts.values())


def _unpack(data: bytes, kind: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"a {kind} message is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _U32.size:
        raise BlobFormatError(f"{kind} message: truncated")
    (n,) = _U32.unpack_from(data)
    if n > 1 << 20 or _U32.size + n > len(data):
        raise BlobFormatError(f"{kind} message: header length out of range (truncated?)")
    try:
        head = json.loads(data[_U32.size:_U32.size + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BlobFormatError(f"{kind} message: header is not JSON") from None
    if not isinstance(head, dict) or head.get("format") != _FORMAT or head.get("kind") != kind:
        found = head.get("kind") if isinstance(head, dict) else None
        raise KeyMismatchError(f"expected a training {kind} message, got {found!r}")
    parts, pos = {}, _U32.size + n
    try:
        for name, size in head["parts"]:
            if not isinstance(size, int) or size < 0 or pos + size > len(data):
                raise BlobFormatError(f"{kind} message: part {name!r} truncated")
            parts[str(name)] = data[pos:pos + size]
            pos += size
    except (TypeError, ValueError):
        raise BlobFormatError(f"{kind} message: malformed part list") from None
    if pos != len(data):
        raise BlobFormatError(f"{kind} message: {len(data) - pos} unexpected trailing bytes")
    meta = head.get("meta")
    if not isinstance(meta, dict):
        raise BlobFormatError(f"{kind} message: no metadata")
    return meta, parts


@dataclass(frozen=True)
class _Packing:
    """Where samples, features and classes live: blocks of `block` slots (a power of two), each
    holding one feature of up to `block` samples; `groups` such sets of ciphertexts when there are
    more samples than that."""

    n: int
    d: int
    classes: int
    slots: int
    block: int

    @classmethod
    def choose(cls, n: int, d: int, classes: int, slots: int) -> _Packing:
        """The block size with the least work per epoch: rotations (log2 of blocks per ciphertext
        per sample group for z, log2 of the block per weight ciphertext for the gradient) plus
        products (groups x weight ciphertexts, twice). Small blocks mean fewer, fuller weight
        ciphertexts and short in-block sums; large ones fewer sample groups."""
        best, best_cost = None, math.inf
        block = 1
        while block <= slots:
            p = cls(n, d, classes, slots, block)
            cost = p.groups * math.log2(p.per_chunk) + p.chunks * math.log2(block) \
                + 2 * p.groups * p.chunks
            if cost < best_cost:
                best, best_cost = p, cost
            block *= 2
        return best

    @property
    def groups(self) -> int:
        return -(-self.n // self.block)

    @property
    def per_chunk(self) -> int:
        return self.slots // self.block

    @property
    def chunks(self) -> int:
        return -(-self.d // self.per_chunk)

    def features_layout(self) -> np.ndarray:
        i, j = np.arange(self.n)[:, None], np.arange(self.d)[None, :]
        ct = (i // self.block) * self.chunks + j // self.per_chunk
        return ct * self.slots + (j % self.per_chunk) * self.block + i % self.block

    def labels_layout(self) -> np.ndarray:
        i, k = np.arange(self.n)[:, None], np.arange(self.classes)[None, :]
        return ((i // self.block) * self.classes + k) * self.slots + i % self.block

    def weights_layout(self) -> np.ndarray:
        k, j = np.arange(self.classes)[:, None], np.arange(self.d)[None, :]
        return (k * self.chunks + j // self.per_chunk) * self.slots + (j % self.per_chunk) * self.block

    def replicated(self, w: np.ndarray) -> list[np.ndarray]:
        """Slot vectors of weights (classes, d), each weight over its feature's whole block."""
        out = []
        for k in range(self.classes):
            for c in range(self.chunks):
                vec = np.zeros(self.slots)
                for f in range(self.per_chunk):
                    j = c * self.per_chunk + f
                    if j < self.d:
                        vec[f * self.block:(f + 1) * self.block] = w[k, j]
                out.append(vec)
        return out

    def rotation_steps(self, replicate: bool) -> list[int]:
        steps = [self.block * (1 << t) for t in range(int(math.log2(self.per_chunk)))]
        steps += [1 << t for t in range(int(math.log2(self.block)))]
        if replicate:
            steps += [-(1 << t) for t in range(int(math.log2(self.block)))]
        return steps


def _with_intercept(x: np.ndarray, intercept: bool) -> np.ndarray:
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1) if intercept else x


def _check_data(x: Any, y: Any, task: str) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}")
    x = (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor)
         else np.asarray(x, dtype=np.float64))
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise InputError(f"features must be (samples, features) with >= 2 samples, got {x.shape}")
    if y.shape != (x.shape[0],):
        raise InputError(f"labels must be one per sample: shape ({x.shape[0]},), got {y.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("features contain NaN or infinite values")
    if task == "linear" and not np.all(np.isfinite(y.astype(np.float64))):
        raise InputError("targets contain NaN or infinite values")
    return x, y


def _targets(y: np.ndarray, task: str, classes: np.ndarray | None) -> np.ndarray:
    """(n, K) targets: one-hot for one-vs-rest, a single 0/1 column for two classes."""
    if task == "linear":
        return y.astype(np.float64)[:, None]
    if classes is None:
        raise InputError("logistic targets need the list of classes")
    if len(classes) == 2:
        return (y == classes[1]).astype(np.float64)[:, None]
    return (y[:, None] == classes[None, :]).astype(np.float64)


class DataOwner:
    """The data owner: data and secret key stay here; sends ciphertexts, refreshes weights."""

    def __init__(self, features: Any, labels: Any, task: str = "logistic", *, depth: int = 4,
                 precision: int = 16, intercept: bool = True, ctx: Context | None = None) -> None:
        x, y = _check_data(features, labels, task)
        x = _with_intercept(x, intercept)
        self.task = task
        self.classes = np.unique(y) if task == "logistic" else None
        if task == "logistic" and len(self.classes) < 2:
            raise InputError("logistic regression needs at least two classes in the labels")
        targets = _targets(y, task, self.classes)
        slots = ctx.slots if ctx is not None else _slots_for(depth, precision)
        self.packing = _Packing.choose(x.shape[0], x.shape[1], targets.shape[1], slots)
        if ctx is None:
            # negative steps re-replicate gradients: only where the depth allows two steps
            ctx = Context(depth, precision=precision,
                          rotations=self.packing.rotation_steps(depth >= 7))
        self.ctx = ctx
        self._x, self._targets = x, targets
        self.refreshes = 0
        self.bytes_received = 0

    def _encrypt(self, layout: np.ndarray, values: np.ndarray, replicate_blocks: bool) -> EncryptedTensor:
        p, slots = self.packing, self.ctx.slots
        count = int(layout.max()) // slots + 1
        buf = np.zeros(count * slots)
        buf[layout.ravel()] = values.ravel()
        vecs = [buf[i * slots:(i + 1) * slots] for i in range(count)]
        if replicate_blocks:  # labels: sample i's label in every block, beside all its features
            vecs = [np.tile(v[:p.block], p.per_chunk) for v in vecs]
        cts = [self.ctx.evaluator.encrypt(v) for v in vecs]
        return EncryptedTensor(self.ctx, cts, layout, torch.float64)

    def _weights(self, w: np.ndarray) -> EncryptedTensor:
        p = self.packing
        cts = [self.ctx.evaluator.encrypt(v) for v in p.replicated(w)]
        return EncryptedTensor(self.ctx, cts, p.weights_layout(), torch.float64)

    def setup(self) -> bytes:
        """The first message: public context, encrypted features and labels, zero weights."""
        p = self.packing
        meta = {"task": self.task, "samples": p.n, "features": p.d, "classes": p.classes,
                "block": p.block}
        parts = {
            "context": self.ctx.serialize_public(),
            "features": self._encrypt(p.features_layout(), self._x, False).serialize(),
            "labels": self._encrypt(p.labels_layout(), self._targets, True).serialize(),
            "weights": self._weights(np.zeros((p.classes, p.d))).serialize(),
        }
        return _pack("setup", meta, parts)

    def _read_weights(self, message: bytes) -> np.ndarray:
        self.bytes_received += len(message)
        _, parts = _unpack(message, "weights")
        if "weights" not in parts:
            raise KeyMismatchError("weights message: no weights in it")
        w = EncryptedTensor.load(self.ctx, parts["weights"])
        if tuple(w.shape) != (self.packing.classes, self.packing.d):
            raise KeyMismatchError(f"weights message: shape {tuple(w.shape)}, expected "
                                   f"{(self.packing.classes, self.packing.d)}")
        if not np.array_equal(w.layout, self.packing.weights_layout()):
            raise KeyMismatchError("weights message: the weights are not where the protocol puts them")
        return w.decrypt().double().numpy()

    def refresh(self, message: bytes) -> bytes:
        """Decrypt the weights (only the weights) and send them back freshly encrypted."""
        w = self._read_weights(message)
        self.refreshes += 1
        return _pack("weights", {}, {"weights": self._weights(w).serialize()})

    def finish(self, message: bytes) -> np.ndarray:
        """The trained weights (classes or 1, features), decrypted."""
        return self._read_weights(message)


def _slots_for(depth: int, precision: int) -> int:
    from gravel.ckks.params import choose_params

    return choose_params(depth, precision_bits=precision).slots


class ComputeParty:
    """The compute party: public context and ciphertexts only; runs gradient descent."""

    def __init__(self, setup: bytes, *, lr: float = 1.0,
                 sigmoid: _approx.Approximation | None = None) -> None:
        meta, parts = _unpack(setup, "setup")
        for name in ("context", "features", "labels", "weights"):
            if name not in parts:
                raise KeyMismatchError(f"setup message: no {name} in it")
        self.ctx = PublicContext.load(parts["context"])
        task = meta.get("task")
        if task not in TASKS:
            raise KeyMismatchError(f"setup message: unknown task {task!r}")
        try:
            n, d, k, block = (int(meta[key]) for key in ("samples", "features", "classes", "block"))
        except (KeyError, TypeError, ValueError):
            raise KeyMismatchError("setup message: sizes missing") from None
        if min(n, d, k) < 1 or block < 1 or block & (block - 1) or block > self.ctx.slots \
                or n * d > 1 << 26:
            raise KeyMismatchError("setup message: sizes out of range")
        self.task = task
        self.packing = _Packing(n, d, k, self.ctx.slots, block)
        x = EncryptedTensor.load(self.ctx, parts["features"])
        y = EncryptedTensor.load(self.ctx, parts["labels"])
        for name, tensor, layout in (("features", x, self.packing.features_layout()),
                                     ("labels", y, self.packing.labels_layout())):
            if tensor.layout.shape != layout.shape or not np.array_equal(tensor.layout, layout):
                raise KeyMismatchError(f"setup message: the {name} are not packed as the "
                                       "protocol says (samples, features, classes disagree)")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise InputError(f"lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.sigmoid = (sigmoid or _approx.sigmoid(-8.0, 8.0, 3)) if task == "logistic" else None
        self._x, self._y = x.cts, y.cts
        self._x_levels: dict[int, list[Ciphertext]] = {x.level: x.cts}
        self._y_scaled: dict[tuple[int, float], Ciphertext] = {}
        self._receive_weights(parts["weights"])
        self.steps = 0
        self.bytes_received = len(setup)
        coeffs = self.sigmoid.coeffs if self.sigmoid else ()
        self.step_depth = 1 + (polyval_depth(list(coeffs)) if self.sigmoid else 1) + 1
        if self.ctx.depth < self.step_depth:
            raise DepthError(
                f"one {task} step needs depth {self.step_depth} (z = Xw 1, "
                f"{'sigmoid ' + str(self.step_depth - 2) if self.sigmoid else 'lr/n 1'}, gradient 1); "
                f"the owner's context has {self.ctx.depth}: the data owner must create it with "
                f"depth >= {self.step_depth}"
            )

    def _receive_weights(self, blob: bytes) -> None:
        w = EncryptedTensor.load(self.ctx, blob)
        if not np.array_equal(w.layout, self.packing.weights_layout()):
            raise KeyMismatchError("weights: not packed as the protocol says")
        self._w = w.cts
        self._replicated = True  # fresh weights fill their blocks

    def _labels_scaled(self, index: int, scale: float) -> Ciphertext:
        """lr/n times a label ciphertext, made once (it is the same every epoch)."""
        key = (index, scale)
        if key not in self._y_scaled:
            self._y_scaled[key] = self.ctx.evaluator.mul_scalar(self._y[index], scale, "lr/n")
        return self._y_scaled[key]

    def _features_at(self, level: int) -> list[Ciphertext]:
        """The feature ciphertexts brought down to `level` once, reused by every class and epoch."""
        cached = self._x_levels.get(level)
        if cached is None:
            ev = self.ctx.evaluator
            cached = self._x_levels[level] = [ev.drop_to(ct, level) for ct in self._x]
        return cached

    def receive(self, message: bytes) -> None:
        """Take refreshed weights from the data owner."""
        self.bytes_received += len(message)
        _, parts = _unpack(message, "weights")
        if "weights" not in parts:
            raise KeyMismatchError("weights message: no weights in it")
        self._receive_weights(parts["weights"])

    def weights_message(self) -> bytes:
        p = self.packing
        tensor = EncryptedTensor(self.ctx, self._w, p.weights_layout(), torch.float64)
        return _pack("weights", {}, {"weights": tensor.serialize()})

    @property
    def needs_refresh(self) -> bool:
        """True when the weights cannot go through another step: too few levels left, or not
        re-replicated over their blocks (the last step had no level to spare for it)."""
        return not self._replicated or min(ct.level for ct in self._w) < self.step_depth

    def step(self) -> bytes | None:
        """One epoch (one gradient step over all samples). Returns the weights message the data
        owner must refresh before the next epoch, or None when the weights have levels left."""
        if self.needs_refresh:
            raise KeyMismatchError("the weights have no levels left: send weights_message() to "
                                   "the data owner and receive() the refreshed weights")
        ev, p = self.ctx.evaluator, self.packing
        scale = self.lr / p.n
        new_w, replicated = [], True
        for k in range(p.classes):
            errors = []
            for g in range(p.groups):
                xs = self._x[g * p.chunks:(g + 1) * p.chunks]
                ws = self._w[k * p.chunks:(k + 1) * p.chunks]
                z = ev.dot_many(list(zip(xs, ws)), "z = X w")
                if p.per_chunk > 1:
                    z = ev.rotate_sum(z, p.block, p.per_chunk)  # z for each sample, every block
                if self.sigmoid is not None:
                    pred = ev.polyval(z, [c * scale for c in self.sigmoid.coeffs], op="sigmoid")
                else:
                    pred = ev.mul_scalar(z, scale, "lr/n")
                errors.append(ev.sub(pred, self._labels_scaled(g * p.classes + k, scale)))
            xs_low = self._features_at(min(e.level for e in errors))
            for c in range(p.chunks):
                grad = ev.dot_many([(errors[g], xs_low[g * p.chunks + c]) for g in range(p.groups)],
                                   "X^T (p - y)")
                grad = ev.rotate_sum(grad, 1, p.block)  # per feature, at its block's first slot
                w = self._w[k * p.chunks + c]
                if grad.level >= self.step_depth + 1:  # keep going: re-replicate the gradient
                    mask = np.zeros(p.slots)
                    mask[np.arange(p.per_chunk) * p.block] = 1.0
                    grad = ev.rotate_sum(ev.mul_plain(grad, mask, "mask"), -1, p.block)
                else:  # right weight at each block's first slot only: the owner refreshes
                    replicated = False
                new_w.append(ev.sub(w, grad))
        self._w, self._replicated = new_w, replicated
        self.steps += 1
        return self.weights_message() if self.needs_refresh else None


# -- the same algorithm in the clear, and the whole exchange in one call ------------------------
def train_plaintext(features: Any, labels: Any, task: str = "logistic", *, epochs: int,
                    lr: float = 1.0, sigmoid: _approx.Approximation | None = None,
                    intercept: bool = True) -> np.ndarray:
    """What the compute party computes, in float64: same start (zeros), same polynomial, same
    learning rate, same epochs. The baseline the encrypted run is compared with."""
    x, y = _check_data(features, labels, task)
    x = _with_intercept(x, intercept)
    classes = np.unique(y) if task == "logistic" else None
    t = _targets(y, task, classes)
    poly = (sigmoid or _approx.sigmoid(-8.0, 8.0, 3)) if task == "logistic" else None
    w = np.zeros((t.shape[1], x.shape[1]))
    for _ in range(epochs):
        z = x @ w.T
        pred = poly(z) if poly is not None else z
        w = w - (lr / x.shape[0]) * (pred - t).T @ x
    return w


def predict(weights: np.ndarray, features: Any, task: str, classes: np.ndarray | None = None,
            intercept: bool = True) -> np.ndarray:
    """Class labels (logistic: argmax of one-vs-rest scores, or z > 0 for two classes) or values."""
    x = _with_intercept(np.asarray(features, dtype=np.float64), intercept)
    z = x @ np.asarray(weights).T
    if task == "linear":
        return z[:, 0]
    if z.shape[1] == 1:
        idx = (z[:, 0] > 0).astype(int)
        return classes[idx] if classes is not None else idx
    idx = z.argmax(1)
    return classes[idx] if classes is not None else idx


@dataclass
class TrainResult:
    weights: np.ndarray
    classes: np.ndarray | None
    epoch_seconds: list[float] = field(default_factory=list)
    compute_seconds: list[float] = field(default_factory=list)
    refresh_seconds: list[float] = field(default_factory=list)
    refreshes: int = 0
    setup_bytes: int = 0
    setup_seconds: float = 0.0
    refresh_bytes: int = 0  # weights sent to the owner and back, per refresh
    depth: int = 0
    poly_modulus_degree: int = 0


def train_encrypted(features: Any, labels: Any, task: str = "logistic", *, epochs: int,
                    lr: float = 1.0, sigmoid: _approx.Approximation | None = None, depth: int = 4,
                    precision: int = 16, intercept: bool = True, ctx: Context | None = None,
                    progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run the protocol in one process (the two parties still exchange only bytes). `ctx`: the
    owner's existing context (default: a new one of `depth` with the rotations it needs)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be a positive integer, got {epochs!r}")
    t0 = time.perf_counter()
    owner = DataOwner(features, labels, task, depth=depth, precision=precision,
                      intercept=intercept, ctx=ctx)
    setup = owner.setup()
    party = ComputeParty(setup, lr=lr, sigmoid=sigmoid)
    result = TrainResult(np.zeros(0), owner.classes, setup_bytes=len(setup),
                         setup_seconds=time.perf_counter() - t0, depth=owner.ctx.depth,
                         poly_modulus_degree=owner.ctx.params.poly_modulus_degree)
    for epoch in range(epochs):
        t = time.perf_counter()
        message = party.step()
        tc = time.perf_counter()
        if message is not None and epoch < epochs - 1:
            reply = owner.refresh(message)
            party.receive(reply)
            result.refreshes += 1
            result.refresh_bytes = len(message) + len(reply)
        te = time.perf_counter()
        result.compute_seconds.append(tc - t)
        result.refresh_seconds.append(te - tc)
        result.epoch_seconds.append(te - t)
        if progress is not None:
            progress(epoch + 1, te - t)
    result.weights = owner.finish(party.weights_message())
    return result
