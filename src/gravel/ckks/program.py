"""A compiled CKKS model: the shared contract of the compiler, the server and the client.

A program is a chain of stages, each an optional affine map (one dense matrix and bias: every
gemm, conv, pooling, reshape and affine between two activations, multiplied out) followed by an
optional polynomial with no constant term whose leading coefficient is 1. The activations'
leading coefficients and constants are folded into the next stage's matrix and bias (or, after
the last stage, into `out_scale` / `out_offset`, which the client applies after decrypting):
that keeps x^2 and every degree-2 fit at one level.

    depth = (stages with a matrix) + sum of polyval_depth(poly)

Packing of one image (`single_plan`), "replicated" where every stage allows it: the input is
repeated with period n_pad (its size rounded up to a power of two) across all slots, and a
stage of m outputs is applied by the hybrid diagonal method: m_pad (m rounded up) generalised
diagonals, periodic with n_pad, evaluated by baby-step/giant-step (gravel.ckks.packing
LinearMap), then a rotate-and-sum with stride m_pad over n_pad / m_pad partial sums leaves the
output repeated with period m_pad: the next stage's input needs no re-layout. For the first
matrix the client rotates replica r by shift * r (shift = m_pad / replicas), which leaves 2 * shift
diagonals: a 784-128 layer at N=8192 costs 64 plaintext products and about 19 rotations
(matmul_map's contiguous layout: ~900 products). Where a stage
widens (m > n) the "contiguous" plan applies instead: one copy of the image, matmul_map's
diagonals (about n + m of them per stage). A batch
is packed SIMD across images, `block` slots per feature and `slots // block` features per
ciphertext, and a matrix costs one plaintext multiplication per (input ciphertext, output
ciphertext, block offset). The rotation steps each packing needs are computed here, from the
weights and the ring, once: the client makes Galois keys for exactly those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from gravel.ckks.evaluator import polyval_depth
from gravel.ckks.packing import contiguous_layout, matmul_map, samples_layout
from gravel.ckks.params import CkksParams
from gravel.errors import ArtifactError, InputError

__all__ = ["CkksProgram", "SinglePlan", "Stage", "batch_cost", "batch_matrices", "batch_ops", "batch_rotation_steps",
           "choose_block", "simd_matrix", "single_plan"]


@dataclass
class Stage:
    """y = poly(x @ weight.T + bias); weight None: no affine map; poly None: no activation."""

    weight: np.ndarray | None
    bias: np.ndarray | None
    poly: tuple[float, ...] | None = None  # coefficients from x^0, with poly[0] == 0, poly[-1] == 1
    source: str = ""

    @property
    def depth(self) -> int:
        return (self.weight is not None) + (polyval_depth(list(self.poly)) if self.poly else 0)


@dataclass
class CkksProgram:
    """What the server evaluates and the client needs to know (see the module doc)."""

    input_shape: tuple[int, ...]
    stages: list[Stage]
    out_scale: float = 1.0
    out_offset: float = 0.0
    params: CkksParams | None = None
    block: int = 1
    single_steps: list[int] = field(default_factory=list)
    batch_steps: list[int] = field(default_factory=list)
    output_slots: list[int] = field(default_factory=list)  # single image: where each output lies
    single_kind: str = "contiguous"  # one image: "replicated" or "contiguous" (see single_plan)
    single_period: int = 0
    single_shift: int = 0  # replicated: replica r of the input is rotated by shift * r
    batch_complex: bool = False  # batch: features j and j + n_batch_in share a slot (re, im)

    @property
    def n_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_out(self) -> int:
        for st in reversed(self.stages):
            if st.weight is not None:
                return int(st.weight.shape[0])
        return self.n_in

    @property
    def depth(self) -> int:
        return sum(st.depth for st in self.stages)

    @property
    def n_batch_in(self) -> int:
        """Slots per sample of the batch input: half the features with complex packing."""
        return -(-self.n_in // 2) if self.batch_complex else self.n_in

    def simulate(self, x: np.ndarray) -> np.ndarray:
        """The program in float64 on a batch (N, *input_shape): what decryption should give,
        up to CKKS noise, after the client's output affine."""
        h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        for st in self.stages:
            if st.weight is not None:
                h = h @ st.weight.T + st.bias
            if st.poly is not None:
                h = np.polynomial.polynomial.polyval(h, np.asarray(st.poly))
        return h * self.out_scale + self.out_offset

    # -- artifact form: JSON for the structure, arrays for npz (never a pickle) -------------
    def to_json(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        stages = []
        for i, st in enumerate(self.stages):
            row: dict[str, Any] = {"poly": list(st.poly) if st.poly else None, "source": st.source,
                                   "weight": None}
            if st.weight is not None:
                row["weight"], row["bias"] = f"s{i}_weight", f"s{i}_bias"
                arrays[row["weight"]] = np.ascontiguousarray(st.weight, dtype=np.float64)
                arrays[row["bias"]] = np.ascontiguousarray(st.bias, dtype=np.float64)
            stages.append(row)
        return {"input_shape": list(self.input_shape), "stages": stages,
                "depth": self.depth, "n_in": self.n_in, "n_out": self.n_out}

    def client_json(self) -> dict[str, Any]:
        """The client's part: parameters, packing and rotation steps; no weights."""
        if self.params is None:
            raise ArtifactError("the program has no CKKS parameters yet (plan it first)")
        return {
            "format": "gravel-ckks-client", "version": 1,
            "params": self.params.to_json(),
            "input_shape": list(self.input_shape), "n_in": self.n_in, "n_out": self.n_out,
            "depth": self.depth,
            "output": {"scale": self.out_scale, "offset": self.out_offset},
            "single": {"layout": self.single_kind, "period": self.single_period,
                       "shift": self.single_shift,
                       "rotation_steps": list(self.single_steps), "output_slots": list(self.output_slots)},
            "batch": {"layout": "samples", "block": self.block, "complex": self.batch_complex,
                      "rotation_steps": list(self.batch_steps)},
        }

    @classmethod
    def from_artifact(cls, program: dict[str, Any], client: dict[str, Any],
                      arrays: dict[str, np.ndarray]) -> CkksProgram:
        """Rebuild from the manifest's program, the client file and the weights; checks shapes."""
        try:
            stages = []
            for row in program["stages"]:
                w = b = None
                if row["weight"] is not None:
                    w, b = arrays[row["weight"]], arrays[row["bias"]]
                    if w.ndim != 2 or b.shape != (w.shape[0],):
                        raise ArtifactError(f"weights {row['weight']}: shapes {w.shape}, {b.shape}")
                poly = tuple(float(c) for c in row["poly"]) if row["poly"] else None
                stages.append(Stage(w, b, poly, str(row.get("source", ""))))
            prog = cls(tuple(int(d) for d in program["input_shape"]), stages,
                       float(client["output"]["scale"]), float(client["output"]["offset"]),
                       CkksParams.from_json(client["params"]), int(client["batch"]["block"]),
                       [int(s) for s in client["single"]["rotation_steps"]],
                       [int(s) for s in client["batch"]["rotation_steps"]],
                       [int(s) for s in client["single"]["output_slots"]],
                       str(client["single"]["layout"]), int(client["single"]["period"]),
                       int(client["single"]["shift"]), bool(client["batch"].get("complex", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"CKKS program: malformed ({type(exc).__name__}: {exc}); recompile") from None
        if prog.depth != int(program.get("depth", -1)) or prog.depth > prog.params.depth:
            raise ArtifactError(f"CKKS program: depth {prog.depth} does not match its parameters "
                                f"({prog.params.depth} levels); recompile")
        return prog

    # -- inputs ----------------------------------------------------------------------------
    def conform(self, x: np.ndarray) -> np.ndarray:
        """A batch (N, n_in) from (N, *input_shape) or one sample of input_shape."""
        x = np.asarray(x, dtype=np.float64)
        if tuple(x.shape) == tuple(self.input_shape):
            x = x[None]
        if tuple(x.shape[1:]) != tuple(self.input_shape) and not (x.ndim == 2 and x.shape[1] == self.n_in):
            raise InputError(f"input of shape {x.shape}; the model takes {self.input_shape} per "
                             "sample (or a batch of them)")
        if not np.all(np.isfinite(x)):
            raise InputError("inputs must be finite (found NaN or infinity)")
        return x.reshape(len(x), self.n_in)


@dataclass
class SinglePlan:
    """How one image is packed and what each stage does with it (see the module doc)."""

    kind: str  # "replicated" or "contiguous"
    period: int  # replicated: the input's period; contiguous: 0
    maps: list[Any]  # per stage: its LinearMap, or None without a matrix
    sums: list[tuple[int, int] | None]  # per stage: rotate-and-sum (stride, count) after the map
    layouts: list[np.ndarray]  # per stage output (contiguous); replicated: slots 0..m-1
    output_slots: list[int]
    shift: int = 0  # replicated: replica r of the input is the image rotated by shift * r

    def rotation_steps(self, slots: int) -> list[int]:
        steps: set[int] = set()
        for lm in self.maps:
            if lm is not None:
                steps.update(lm.rotation_steps())
        for sm in self.sums:
            if sm is not None:
                stride, count = sm
                k = 1
                while k < count:
                    s = (k * stride) % slots
                    steps.add(s if s <= slots // 2 else s - slots)
                    k *= 2
        return sorted(steps, key=lambda v: (abs(v), v))


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _replicated_map(weight: np.ndarray, slots: int, available_steps: list[int] | None) -> Any:
    from gravel.ckks.packing import LinearMap

    m, n = weight.shape
    m_pad, n_pad = _pow2(m), _pow2(n)
    padded = np.zeros((m_pad, n_pad))
    padded[:m, :n] = weight
    s = np.arange(slots)
    k = np.arange(m_pad)
    out_s = np.broadcast_to(s[:, None], (slots, m_pad))
    in_s = (s[:, None] + k[None, :]) % slots
    w = padded[(s % m_pad)[:, None], (s[:, None] + k[None, :]) % n_pad]
    return LinearMap.from_entries(out_s, in_s, w, slots, 1, available_steps)


def _shifted_map(weight: np.ndarray, slots: int, shift: int,
                 available_steps: list[int] | None) -> Any:
    """The first matrix on an input whose R replicas are rotated by `shift` each (the client
    lays them out so): x_j meets output i in the replica and position where their offset is
    below `shift`, so 2 * shift diagonals (instead of m_pad) serve, and a rotate-and-sum over
    every position (stride m_pad) leaves the output repeated with period m_pad."""
    from gravel.ckks.packing import LinearMap

    m, n = weight.shape
    m_pad, n_pad = _pow2(m), _pow2(n)
    replicas = slots // n_pad
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    d = (j - i) % n_pad
    q = d // shift  # the offset left, d % shift, is the diagonal
    r, t = q % replicas, q // replicas
    out_s = n_pad * r + i + m_pad * t
    in_s = n_pad * r + (j - shift * r) % n_pad
    return LinearMap.from_entries(out_s, in_s, weight, slots, 1, available_steps)


def single_plan(program: CkksProgram, slots: int,
                available_steps: list[int] | None = None) -> SinglePlan:
    """The packing of one image for a ring of `slots` slots (see the module doc)."""
    dims = [program.n_in] + [int(st.weight.shape[0]) for st in program.stages if st.weight is not None]
    if all(_pow2(b) <= _pow2(a) <= slots for a, b in pairwise(dims)) and _pow2(dims[0]) <= slots:
        maps: list[Any] = []
        sums: list[tuple[int, int] | None] = []
        layouts = []
        width = program.n_in
        first = program.stages[0].weight
        replicas = slots // _pow2(program.n_in)
        # replicas rotated by the client: fewer diagonals for the first (largest) matrix
        shift = _pow2(first.shape[0]) // replicas if first is not None and replicas > 1 else 0
        shift = shift if shift >= 2 else 0
        for k, st in enumerate(program.stages):
            if st.weight is None:
                maps.append(None)
                sums.append(None)
            else:
                m_pad, n_pad = _pow2(st.weight.shape[0]), _pow2(st.weight.shape[1])
                if k == 0 and shift:
                    maps.append(_shifted_map(st.weight, slots, shift, available_steps))
                    sums.append((m_pad, slots // m_pad))
                else:
                    maps.append(_replicated_map(st.weight, slots, available_steps))
                    sums.append((m_pad, n_pad // m_pad) if n_pad > m_pad else None)
                width = int(st.weight.shape[0])
            layouts.append(np.arange(width, dtype=np.int64))
        return SinglePlan("replicated", _pow2(program.n_in), maps, sums, layouts, list(range(width)),
                          shift)
    layout = contiguous_layout((program.n_in,), slots)
    maps, layouts = [], []
    for st in program.stages:
        if st.weight is None:
            maps.append(None)
        else:
            lm, layout = matmul_map(st.weight.T, layout, slots, available_steps)
            maps.append(lm)
        layouts.append(layout)
    return SinglePlan("contiguous", 0, maps, [None] * len(maps), layouts,
                      [int(v) for v in layout.ravel()])


def batch_matrices(program: CkksProgram, slots: int, block: int) -> list[tuple[int, int, int]]:
    """Per matrix of the batch path: (input chunks, output chunks, baby steps b). Output chunk
    oc sums, over the per = slots / block block offsets k = b * j + i, products of input chunks
    rotated by i blocks (b - 1 rotations of each input, shared by every output) then rotated by
    b * j blocks (per / b - 1 rotations of each output): b, a power of two dividing per, makes
    the fewest rotations."""
    per = slots // block
    out = []
    for st in program.stages:
        if st.weight is None:
            continue
        n_out, n_in = st.weight.shape
        if not out and program.batch_complex:
            n_in = program.n_batch_in
        ic, oc = -(-n_in // per), -(-n_out // per)
        b = min((1 << e for e in range(per.bit_length()) if 1 << e <= per),
                key=lambda v: (ic * (v - 1) + oc * (per // v - 1), v))
        out.append((ic, oc, b))
    return out


def batch_rotation_steps(program: CkksProgram, slots: int, block: int) -> list[int]:
    """SIMD across images: the block offsets of every matrix's baby and giant steps (see
    `batch_matrices`), each a Galois key of its own (about 2 sqrt(per) per matrix)."""
    wanted = set()
    per = slots // block
    for _, _, b in batch_matrices(program, slots, block):
        wanted.update(i * block for i in range(1, b))
        wanted.update(b * j * block for j in range(1, per // b))
    out = set()
    for step in wanted:
        s = step % slots
        if s:
            out.add(s if s <= slots // 2 else s - slots)
    return sorted(out)


# Costs of the batch path's operations at N=8192 on the top level (ms, measured on the 2-core
# development VM with SEAL through TenSEAL, in the batch loop): encoding a plaintext vector, a
# plaintext product with its accumulation (memory-bound: a ciphertext is 786 kB), one
# key-switched rotation, one square with relinearisation and rescale. Only their ratios steer
# `choose_block`.
_COST_ENCODE, _COST_PRODUCT, _COST_ROTATE, _COST_SQUARE = 1.07, 0.67, 7.4, 4.0


def simd_matrix(weight: np.ndarray, per: int, packed: bool = False) -> np.ndarray:
    """A matrix as the batch path applies it, T[oc, k, ic, po]: the weight that output
    oc * per + po takes from input ic * per + (po + k) % per (block offset k). `packed`: the
    input holds features j and j + h in one complex slot; the weights become
    (w_j - i w_{j+h}) / 2, whose product's real part sums both (taken as s + conj(s))."""
    n_out, n_in = weight.shape
    w = np.asarray(weight, dtype=np.float64)
    if packed:
        half = -(-n_in // 2)
        wide = np.zeros((n_out, 2 * half))
        wide[:, :n_in] = w
        w, n_in = (wide[:, :half] - 1j * wide[:, half:]) / 2, half
    ic, oc = -(-n_in // per), -(-n_out // per)
    padded = np.zeros((oc * per, ic * per), dtype=w.dtype)
    padded[:n_out, :n_in] = w
    po, k = np.arange(per), np.arange(per)
    cols = (np.arange(ic)[None, :, None] * per + (po[None, None, :] + k[:, None, None]) % per)  # (k, ic, po)
    rows = np.arange(oc)[:, None, None, None] * per + po[None, None, None, :]  # (oc, 1, 1, po)
    return padded[rows, cols[None]]


def batch_ops(program: CkksProgram, slots: int, block: int, batch: int) -> dict[str, int]:
    """What the server does for one batch of `batch` samples packed `block` per feature
    (CkksServer.batch), counted from the weights: a matrix encodes one plaintext per
    (output chunk, block offset, input chunk) with a nonzero weight, once, and multiplies it
    into every group; rotations as `batch_matrices` plans them (a giant step whose sum is
    empty is skipped), plus one conjugation per output of a complex-packed first matrix; an
    activation squares each of its ciphertexts once per level."""
    per = slots // block
    groups = -(-batch // block)
    ops = {"encodes": 0, "products": 0, "rotations": 0, "squares": 0}
    mats = iter(batch_matrices(program, slots, block))
    width = program.n_in
    for k, st in enumerate(program.stages):
        if st.weight is not None:
            ic, oc, b = next(mats)
            packed = k == 0 and program.batch_complex
            nonzero = np.any(simd_matrix(st.weight, per, packed) != 0, axis=3)  # (oc, per, ic)
            encodes = int(nonzero.sum())
            giants = nonzero.reshape(oc, per // b, b * ic).any(axis=2)[:, 1:].sum()
            ops["encodes"] += encodes
            ops["products"] += encodes * groups
            ops["rotations"] += groups * (ic * (b - 1) + int(giants))
            if packed:
                ops["rotations"] += groups * int(nonzero.reshape(oc, -1).any(axis=1).sum())
            width = int(st.weight.shape[0])
        if st.poly is not None:
            ops["squares"] += groups * -(-width // per) * polyval_depth(list(st.poly))
    return ops


def batch_cost(program: CkksProgram, slots: int, block: int, batch: int) -> float:
    """Modelled server time (ms, see the constants above) of `batch_ops`. Small blocks make
    fewer plaintexts, each reused by more groups, but more groups to rotate."""
    ops = batch_ops(program, slots, block, batch)
    return (ops["encodes"] * _COST_ENCODE + ops["products"] * _COST_PRODUCT
            + ops["rotations"] * _COST_ROTATE + ops["squares"] * _COST_SQUARE)


MAX_BLOCKS = 256  # blocks per ciphertext: keys grow as 2 sqrt(blocks) per matrix


def choose_block(program: CkksProgram, slots: int, batch: int) -> int:
    """The block (samples per feature, a power of two) that `batch_cost` finds cheapest for
    batches of `batch` samples, among blocks of at least slots / MAX_BLOCKS slots (so that
    the rotation keys stay few) and at most the batch; ties go to the larger block."""
    if batch < 1:
        raise InputError(f"a batch needs at least one sample, got {batch}")
    low = max(1, slots // MAX_BLOCKS)
    top = max(low, min(_pow2(batch), slots))
    candidates = [1 << e for e in range(low.bit_length() - 1, top.bit_length())]
    return min(reversed(candidates), key=lambda blk: batch_cost(program, slots, blk, batch))


def batch_layout(program: CkksProgram, n: int, features: int, slots: int) -> np.ndarray:
    """Slots of (sample, feature) in the SIMD packing (one group of at most `block` samples)."""
    return samples_layout(n, features, slots, program.block)
