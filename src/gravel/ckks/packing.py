"""Slot layouts, and linear maps on them by the diagonal method with baby-step/giant-step rotations.

A *layout* is a numpy int64 array of a tensor's shape whose entries are global slot indices
(`ciphertext * slots + slot`): where each element lives. Reshape, transpose and indexing are
operations on that array and cost nothing encrypted.

A *linear map* sends the elements of one layout to another with plain weights:
y[out] = sum w * x[in]. Grouping the (out slot, in slot, weight) entries by the rotation
`(in slot - out slot) mod slots` gives the map's generalised diagonals d_k, and

    y = sum_k d_k * rot(x, k)        (rot(x, k)[i] = x[i + k]: SEAL's left rotation)

With k = g*t + b this is sum_t rot(sum_b rot(d_k, -g*t) * rot(x, b), g*t): rotations of the
input by the baby steps b are shared, and one giant rotation serves each t (Halevi-Shoup's
baby-step/giant-step). One plaintext multiplication per diagonal, one rescale per output
ciphertext: a linear map costs one level. Matrix-vector products, SIMD batches of them,
convolutions, pooling, sums over an axis and re-layouts are all such maps; the builders below
make them from numpy weights, and `LinearMap.rotation_steps` says which Galois keys they need.

Output layouts are *aligned*: an output element is put where one of its inputs lives (for a
matrix product, y[r, i] where x[r, i mod n] is), which keeps the number of distinct rotations
near the width of the operation rather than the size of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gravel.errors import InputError

if TYPE_CHECKING:
    from gravel.ckks.ciphertext import Ciphertext
    from gravel.ckks.evaluator import Evaluator

__all__ = [
    "LinearMap",
    "avg_pool2d_map",
    "contiguous_layout",
    "conv2d_map",
    "gather_map",
    "matmul_map",
    "n_chunks",
    "samples_layout",
    "sum_map",
]


# -- layouts -----------------------------------------------------------------------------------
def contiguous_layout(shape: Sequence[int], slots: int, first_chunk: int = 0) -> np.ndarray:
    """Row-major layout that never splits the largest trailing block that fits in one
    ciphertext: `shape[k:]` blocks are packed whole, as many per ciphertext as fit."""
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    if size == 0:
        return np.zeros(shape, dtype=np.int64)
    inner, k = 1, len(shape)
    while k > 0 and inner * shape[k - 1] <= slots:
        inner *= shape[k - 1]
        k -= 1
    if k == len(shape) or inner == 0:
        # not even one trailing element... (only when slots < 1); or a last axis longer than
        # a ciphertext: split it plainly across ciphertexts
        flat = np.arange(size, dtype=np.int64)
        return (flat + first_chunk * slots).reshape(shape)
    per_chunk = slots // inner
    outer = size // inner
    o = np.arange(outer, dtype=np.int64)
    base = (o // per_chunk + first_chunk) * slots + (o % per_chunk) * inner
    return (base[:, None] + np.arange(inner, dtype=np.int64)[None, :]).reshape(shape)


def samples_layout(n_samples: int, n_features: int, slots: int, block: int | None = None) -> np.ndarray:
    """SIMD across samples: feature j of every sample lies in one block of `block` (>= n_samples)
    consecutive slots, `slots // block` features per ciphertext. A layout of shape
    (n_samples, n_features). One slot-wise operation then acts on every sample at once, and a sum
    over samples is a rotate-and-sum inside a block."""
    if n_samples < 1 or n_features < 1:
        raise InputError("samples_layout needs at least one sample and one feature")
    if block is None:
        block = 1 << (n_samples - 1).bit_length()
    if block < n_samples or block > slots:
        raise InputError(
            f"{n_samples} samples do not fit in blocks of {block} slots ({slots} per ciphertext): "
            "split the samples into batches of at most the slot count"
        )
    per_chunk = slots // block
    j = np.arange(n_features, dtype=np.int64)
    base = (j // per_chunk) * slots + (j % per_chunk) * block
    return base[None, :] + np.arange(n_samples, dtype=np.int64)[:, None]


def n_chunks(layout: np.ndarray, slots: int) -> int:
    """Ciphertexts a layout spans (its highest ciphertext index + 1)."""
    return int(layout.max()) // slots + 1 if layout.size else 0


# -- linear maps -------------------------------------------------------------------------------
@dataclass
class _Plan:
    g: int
    baby: dict[int, list[int]]  # in chunk -> baby steps
    giant: dict[int, list[int]]  # out chunk -> giant multiples t
    cost: float
    terms: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)
    # (out chunk, t) -> [(in chunk, k)]


@dataclass
class LinearMap:
    """A plain-weighted linear map between slot layouts, evaluated by BSGS (one level).

    `diagonals[(in_chunk, out_chunk)][k]` is the generalised diagonal for rotation k (a vector
    of `slots` weights indexed by output slot)."""

    slots: int
    out_chunks: int
    diagonals: dict[tuple[int, int], dict[int, np.ndarray]]
    available_steps: frozenset[int] | None = None
    _plan: _Plan | None = field(default=None, repr=False)
    _encoded: dict[int, dict[tuple[int, int, int], Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_entries(cls, out_slots: np.ndarray, in_slots: np.ndarray, weights: np.ndarray,
                     slots: int, out_chunks: int | None = None,
                     available_steps: Sequence[int] | None = None) -> LinearMap:
        """From (global out slot, global in slot, weight) triplets; duplicates add up.
        `available_steps`: the Galois key steps the evaluating context has (None: plan as if
        each needed step gets its own key, as a model compiler asking for keys does)."""
        out_slots = np.asarray(out_slots, dtype=np.int64).ravel()
        in_slots = np.asarray(in_slots, dtype=np.int64).ravel()
        weights = np.asarray(weights, dtype=np.float64).ravel()
        if not (out_slots.shape == in_slots.shape == weights.shape):
            raise InputError("a linear map needs as many out slots, in slots and weights")
        if not np.all(np.isfinite(weights)):
            raise InputError("linear map weights must be finite")
        keep = weights != 0
        out_slots, in_slots, weights = out_slots[keep], in_slots[keep], weights[keep]
        oc, os_ = np.divmod(out_slots, slots)
        ic, is_ = np.divmod(in_slots, slots)
        k = (is_ - os_) % slots
        diagonals: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        if out_slots.size:
            key = (ic * (int(oc.max()) + 1) + oc) * slots + k
            order = np.argsort(key, kind="stable")
            key, os_, weights = key[order], os_[order], weights[order]
            ic, oc, k = ic[order], oc[order], k[order]
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            ends = np.r_[starts[1:], key.size]
            for s, e in zip(starts, ends):
                diag = np.zeros(slots)
                np.add.at(diag, os_[s:e], weights[s:e])
                if np.any(diag):
                    diagonals.setdefault((int(ic[s]), int(oc[s])), {})[int(k[s])] = diag
        n_out = out_chunks if out_chunks is not None else (
            int(out_slots.max()) // slots + 1 if out_slots.size else 1)
        steps = None if available_steps is None else frozenset(int(v) for v in available_steps)
        return cls(slots, n_out, diagonals, steps)

    # -- planning --------------------------------------------------------------------------
    def _step_cost(self, step: int) -> float:
        s = step % self.slots
        if s == 0:
            return 0.0
        if self.available_steps is None or s in self.available_steps or \
                s - self.slots in self.available_steps:
            return 1.0
        from gravel.ckks.evaluator import _naf

        return float(min(len(_naf(s)), len(_naf(s - self.slots))))

    def plan(self) -> _Plan:
        """Choose the baby-step size g minimising the rotations (each costed by the keys that
        exist: a step without its own key costs its signed-binary weight)."""
        if self._plan is not None:
            return self._plan
        best = None
        g = 1
        while g <= self.slots:
            baby: dict[int, set[int]] = {}
            giant: dict[int, set[int]] = {}
            for (ic, oc), diags in self.diagonals.items():
                for k in diags:
                    baby.setdefault(ic, set()).add(k % g)
                    giant.setdefault(oc, set()).add(k // g)
            cost = sum(self._step_cost(b) for bs in baby.values() for b in bs)
            cost += sum(self._step_cost(t * g) for ts in giant.values() for t in ts)
            if best is None or cost < best.cost:
                best = _Plan(g, {c: sorted(v) for c, v in baby.items()},
                             {c: sorted(v) for c, v in giant.items()}, cost)
            g *= 2
        if best is None:
            best = _Plan(1, {}, {}, 0.0)
        for (ic, oc), diags in self.diagonals.items():
            for k in diags:
                best.terms.setdefault((oc, k // best.g), []).append((ic, k))
        self._plan = best
        return best

    @property
    def n_diagonals(self) -> int:
        return sum(len(d) for d in self.diagonals.values())

    def rotation_steps(self) -> list[int]:
        """The rotation steps (Galois keys) this map's evaluation uses, normalised to
        (-slots/2, slots/2]."""
        plan = self.plan()
        steps = {b for bs in plan.baby.values() for b in bs}
        steps |= {t * plan.g for ts in plan.giant.values() for t in ts}
        out = set()
        for s in steps:
            s %= self.slots
            if s:
                out.add(s if s <= self.slots // 2 else s - self.slots)
        return sorted(out)

    # -- evaluation ------------------------------------------------------------------------
    def _encoded_at(self, ev: Evaluator, level: int) -> dict[tuple[int, int, int], Any]:
        cached = self._encoded.get(level)
        if cached is None:
            plan = self.plan()
            cached = {}
            for (ic, oc), diags in self.diagonals.items():
                for k, diag in diags.items():
                    t = k // plan.g
                    # rot(d_k, -g t): the diagonal pre-rotated so the giant rotation undoes it
                    cached[(ic, oc, k)] = ev.encode_for_product(np.roll(diag, plan.g * t), level)
            self._encoded[level] = cached
        return cached

    def apply(self, ev: Evaluator, inputs: Sequence[Ciphertext | None],
              op: str = "a linear map", part: tuple[int, int] | None = None) -> list[Ciphertext]:
        """The output ciphertexts (`out_chunks` of them, one level below the inputs).
        `inputs[c]` is input ciphertext c (None where the map reads nothing from it).
        `part=(i, n)`: only giant steps i, i + n, ... of each output: a partial sum (the map
        split among n workers; the n partial outputs add up to the whole)."""
        present = [c for c in inputs if c is not None]
        if not present:
            raise InputError(f"{op}: no input ciphertexts")
        present = ev.align(*present)
        it = iter(present)
        xs = [next(it) if c is not None else None for c in inputs]
        level = present[0].level
        ev._need(level, 1, op)
        for ic, _ in self.diagonals:
            if ic >= len(xs) or xs[ic] is None:
                raise InputError(f"{op}: the map reads input ciphertext {ic}, which is missing")
        plan = self.plan()
        encoded = self._encoded_at(ev, level)
        giants = {oc: ts if part is None else ts[part[0]::part[1]] for oc, ts in plan.giant.items()}
        used: dict[int, set[int]] = {}
        for oc, ts in giants.items():
            for t in ts:
                for ic, k in plan.terms.get((oc, t), []):
                    used.setdefault(ic, set()).add(k % plan.g)
        baby = {ic: {b: ev.rotate(xs[ic], b) for b in sorted(bs)} for ic, bs in used.items()}
        outs = []
        for oc in range(self.out_chunks):
            total = None
            for t in giants.get(oc, []):
                inner = None
                for ic, k in plan.terms.get((oc, t), []):
                    prod = ev.mul_encoded(baby[ic][k % plan.g], encoded[(ic, oc, k)],
                                          rescale=False)
                    inner = prod if inner is None else ev.add(inner, prod)
                if inner is None:
                    continue
                inner = ev.rotate(inner, t * plan.g)
                total = inner if total is None else ev.add(total, inner)
            outs.append(ev.zeros(level - 1) if total is None else ev.rescale(total.seal))
        return outs


# -- builders: numpy weights in, a LinearMap out ------------------------------------------------
def _aligned(in_layout: np.ndarray, n_out_groups: int, slots: int) -> tuple[np.ndarray, int]:
    """Output chunk offset for each group of aligned outputs."""
    chunks = n_chunks(in_layout, slots)
    return np.arange(n_out_groups, dtype=np.int64) * chunks * slots, chunks * n_out_groups


def matmul_map(weight: np.ndarray, in_layout: np.ndarray, slots: int,
               available_steps: Sequence[int] | None = None) -> tuple[LinearMap, np.ndarray]:
    """x @ weight for x laid out as `in_layout` (shape (..., n)), weight (n, m): the map and the
    output layout (shape (..., m)), output i aligned with input i mod n."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2 or in_layout.ndim < 1 or in_layout.shape[-1] != weight.shape[0]:
        raise InputError(
            f"matmul: an input of shape {tuple(in_layout.shape)} cannot multiply a matrix of shape "
            f"{tuple(weight.shape)}: the last input size must equal the matrix's first"
        )
    n, m = weight.shape
    rows = in_layout.reshape(-1, n)
    groups = -(-m // n)
    shift, total = _aligned(in_layout, groups, slots)
    i = np.arange(m)
    out_layout = rows[:, i % n] + shift[i // n][None, :]
    # entries: out (r, i) <- in (r, j) with weight[j, i]
    r_count = rows.shape[0]
    out_s = np.broadcast_to(out_layout[:, None, :], (r_count, n, m))
    in_s = np.broadcast_to(rows[:, :, None], (r_count, n, m))
    w = np.broadcast_to(weight[None, :, :], (r_count, n, m))
    lm = LinearMap.from_entries(out_s, in_s, w, slots, total, available_steps)
    return lm, out_layout.reshape(in_layout.shape[:-1] + (m,))


def sum_map(in_layout: np.ndarray, axis: int, slots: int, scale: float = 1.0,
            available_steps: Sequence[int] | None = None) -> tuple[LinearMap, np.ndarray]:
    """scale * sum over `axis`, each output aligned with the first element it sums."""
    moved = np.moveaxis(in_layout, axis, -1)
    out_layout = moved[..., 0]
    out_s = np.broadcast_to(out_layout[..., None], moved.shape)
    lm = LinearMap.from_entries(out_s, moved, np.full(moved.shape, float(scale)), slots,
                                n_chunks(in_layout, slots), available_steps)
    return lm, out_layout


def gather_map(out_layout: np.ndarray, in_layout: np.ndarray, slots: int,
               out_chunks: int | None = None, scale: float = 1.0,
               available_steps: Sequence[int] | None = None) -> LinearMap:
    """Move element e from `in_layout[e]` to `out_layout[e]` (same shapes; `in_layout` may
    repeat slots, as a broadcast view does): a re-layout."""
    if out_layout.shape != in_layout.shape:
        raise InputError(f"gather: layouts of shapes {out_layout.shape} and {in_layout.shape}")
    return LinearMap.from_entries(out_layout, in_layout, np.full(out_layout.shape, float(scale)),
                                  slots, out_chunks, available_steps)


def _conv_entries(in_layout: np.ndarray, kernel: np.ndarray, stride: int, padding: int,
                  slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """in_layout (N, C, H, W), kernel (Co, C, kh, kw): entries and aligned output layout."""
    n, c, h, w = in_layout.shape
    co, ci, kh, kw = kernel.shape
    if ci != c:
        raise InputError(f"conv2d: the kernel takes {ci} input channels, the input has {c}")
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    if ho < 1 or wo < 1:
        raise InputError(f"conv2d: a {kh}x{kw} kernel does not fit a {h}x{w} input "
                         f"with padding {padding}")
    ys = np.arange(ho) * stride
    xs = np.arange(wo) * stride
    groups = -(-co // c)
    shift, total = _aligned(in_layout, groups, slots)
    anchor_y = np.minimum(ys, h - 1)
    anchor_x = np.minimum(xs, w - 1)
    oc = np.arange(co)
    # out[n, o, y, x] at the slot of in[n, o % c, y*s, x*s] (+ chunk group o // c)
    out_layout = (in_layout[:, oc % c][:, :, anchor_y][:, :, :, anchor_x]
                  + shift[oc // c][None, :, None, None])
    if len(np.unique(out_layout)) != out_layout.size:
        # anchors collide (stride larger than the input?): give the output fresh ciphertexts
        out_layout = contiguous_layout(out_layout.shape, slots, first_chunk=total)
        total = n_chunks(out_layout, slots)
    outs, ins, ws = [], [], []
    for dy in range(kh):
        iy = ys + dy - padding
        vy = (iy >= 0) & (iy < h)
        for dx in range(kw):
            ix = xs + dx - padding
            vx = (ix >= 0) & (ix < w)
            if not vy.any() or not vx.any():
                continue
            yy, xx = np.nonzero(vy)[0], np.nonzero(vx)[0]
            # (n, co, ci, y, x)
            o_sl = out_layout[:, :, yy][:, :, :, xx][:, :, None, :, :]
            i_sl = in_layout[:, :, iy[yy]][:, :, :, ix[xx]][:, None, :, :, :]
            wt = kernel[:, :, dy, dx][None, :, :, None, None]
            shape = (n, co, c, len(yy), len(xx))
            outs.append(np.broadcast_to(o_sl, shape).ravel())
            ins.append(np.broadcast_to(i_sl, shape).ravel())
            ws.append(np.broadcast_to(wt, shape).ravel())
    return np.concatenate(outs), np.concatenate(ins), np.concatenate(ws), out_layout, total


def conv2d_map(kernel: np.ndarray, in_layout: np.ndarray, slots: int, stride: int = 1,
               padding: int = 0, available_steps: Sequence[int] | None = None
               ) -> tuple[LinearMap, np.ndarray]:
    """2-D convolution (cross-correlation, as torch) with a plain kernel (Co, C, kh, kw) of an
    input laid out as (N, C, H, W): the map and the output layout (N, Co, Ho, Wo)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4 or in_layout.ndim != 4:
        raise InputError("conv2d takes an input (N, C, H, W) and a kernel (Co, C, kh, kw)")
    if stride < 1 or padding < 0:
        raise InputError("conv2d: stride must be >= 1 and padding >= 0")
    o, i, w, out_layout, total = _conv_entries(in_layout, kernel, stride, padding, slots)
    return LinearMap.from_entries(o, i, w, slots, total, available_steps), out_layout


def avg_pool2d_map(in_layout: np.ndarray, kernel_size: int, stride: int | None, slots: int,
                   available_steps: Sequence[int] | None = None) -> tuple[LinearMap, np.ndarray]:
    """Average pooling (no padding) of an input laid out as (N, C, H, W), per channel."""
    if in_layout.ndim != 4:
        raise InputError("avg_pool2d takes an input (N, C, H, W)")
    stride = kernel_size if stride is None else stride
    if kernel_size < 1 or stride < 1:
        raise InputError("avg_pool2d: kernel_size and stride must be >= 1")
    n, c, h, w = in_layout.shape
    flat = in_layout.reshape(n * c, 1, h, w)
    kernel = np.full((1, 1, kernel_size, kernel_size), 1.0 / kernel_size**2)
    o, i, wt, out_layout, total = _conv_entries(flat, kernel, stride, 0, slots)
    lm = LinearMap.from_entries(o, i, wt, slots, total, available_steps)
    return lm, out_layout.reshape(n, c, out_layout.shape[2], out_layout.shape[3])
