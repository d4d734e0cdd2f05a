"""The compute party of a CKKS model: evaluation from a public context only.

It receives the client's public context (relinearisation and Galois keys, no secret key) and
input ciphertexts, both framed with the model's digest, and returns output ciphertexts framed
the same way. Keys of another model, keys missing a rotation the plan needs, or parameters other
than the artifact's are refused before any work starts, naming what is wrong.

One image (mode "single"): every stage's matrix by the diagonal method (LinearMap, BSGS
rotations), whose encoded diagonals are kept after the first call. A batch (mode "batch"):
SIMD across images; each matrix costs one plaintext product per (input ciphertext, output
ciphertext, block offset), encoded as it is used (a batch's diagonals would not fit in memory)
and shared by every group of the batch.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np

from gravel.ckks.blob import blob_parts, dump_ciphertexts, join_parts, load_ciphertexts
from gravel.ckks.ciphertext import Ciphertext
from gravel.ckks.context import PublicContext
from gravel.ckks.evaluator import Evaluator
from gravel.ckks.params import CkksParams
from gravel.ckks.program import CkksProgram, batch_matrices, simd_matrix, single_plan
from gravel.errors import InputError, KeyMismatchError
from gravel.protocol.framing import HEADER_SIZE, Kind, frame, unframe

__all__ = ["MODES", "CkksServer", "check_public_context", "input_header"]

MODES = ("single", "batch")


def check_public_context(ctx: PublicContext, params: CkksParams, steps: dict[str, list[int]],
                         modes: tuple[str, ...] | None = MODES, conjugate: bool = False) -> tuple[str, ...]:
    """Check a client's public context against a program's parameters and the rotation steps of
    each packing mode (and, with `conjugate`, the conjugation key of a complex-packed batch);
    returns the modes it serves. With `modes`, every one of them must be served; with None, at
    least one (a client may make keys for one packing only)."""
    if ctx.has_secret_key():
        raise KeyMismatchError("CKKS evaluation keys hold a secret key; refusing them")
    if ctx.params != params:
        raise KeyMismatchError(
            f"CKKS keys for parameters {ctx.params.to_json()}, this model needs "
            f"{params.to_json()}: make the keys from this model's artifact"
        )
    missing = {mode: [s for s in steps[mode] if not ctx.has_rotation(s)] for mode in MODES}
    no_conjugation = conjugate and not ctx.has_conjugation()
    for mode in modes or ():
        if missing[mode]:
            raise KeyMismatchError(_lacking(missing[mode], steps[mode], mode))
        if mode == "batch" and no_conjugation:
            raise KeyMismatchError(
                "CKKS evaluation keys lack the complex-conjugation key that batch inference of "
                "this model needs: generate the keys with this model's client spec"
            )
    served = tuple(m for m in MODES if not missing[m] and not (m == "batch" and no_conjugation))
    if not served:
        raise KeyMismatchError(
            "CKKS evaluation keys serve neither packing of this model: they lack "
            + " and ".join(f"{len(missing[m])} of the {len(steps[m])} rotation steps of {m} inference "
                           f"({_few(missing[m])})" for m in MODES)
            + ": generate the keys with this model's client spec")
    return served


def input_header(data: bytes) -> dict[str, Any]:
    """The caller's header (mode, n) of an input blob, read without keys or the model: for
    routing only (where to run it); `CkksServer.parse_input` checks the blob in full."""
    data = bytes(data)
    digest = data[6:HEADER_SIZE] if len(data) >= HEADER_SIZE else b""
    payload = unframe(data, Kind.INPUT_CIPHERTEXT, digest, what="CKKS input")
    return blob_parts(payload, what="CKKS input")[1]


def _few(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps[:8]) + (" ..." if len(steps) > 8 else "")


def _lacking(missing: list[int], steps: list[int], mode: str) -> str:
    return (f"CKKS evaluation keys lack the rotation steps [{_few(missing)}] ({len(missing)} of "
            f"{len(steps)}) that {mode} inference needs: generate the keys with this model's client "
            "spec (keygen with that mode)")


class CkksServer:
    """Evaluates one compiled CKKS program for any number of clients' public contexts."""

    def __init__(self, program: CkksProgram, digest: bytes) -> None:
        if program.params is None:
            raise InputError("the CKKS program is not planned (no parameters)")
        self.program = program
        self.digest = digest
        self.slots = program.params.slots
        self._plan = single_plan(program, self.slots)
        if (self._plan.kind, self._plan.shift, self._plan.output_slots) != (
                program.single_kind, program.single_shift, program.output_slots):
            raise InputError("the CKKS program's packing does not match its planned layout; recompile")
        self._single_bias = [self._bias_vectors(st, lay) for st, lay in
                             zip(program.stages, self._plan.layouts)]

    # -- keys ------------------------------------------------------------------------------
    def load_keys(self, data: bytes, modes: tuple[str, ...] = MODES) -> PublicContext:
        """The client's evaluation keys, checked against this model's plan for `modes`."""
        payload = unframe(bytes(data), Kind.EVALUATION_KEYS, self.digest, what="CKKS evaluation keys")
        ctx = PublicContext.load(payload)
        self.check_keys(ctx, modes)
        return ctx

    def check_keys(self, ctx: PublicContext, modes: tuple[str, ...] = MODES) -> None:
        check_public_context(ctx, self.program.params, self.rotation_steps(), modes,
                             conjugate=self.program.batch_complex)

    def rotation_steps(self) -> dict[str, list[int]]:
        return {"single": list(self.program.single_steps), "batch": list(self.program.batch_steps)}

    # -- inference -------------------------------------------------------------------------
    def parse_input(self, ctx: PublicContext, data: bytes) -> tuple[str, int, list[Ciphertext]]:
        """An input blob (from CkksClient.encrypt), checked against `ctx` and this program:
        (mode, sample count, ciphertexts). Refuses by name a blob of another model or another
        key set, a mode the keys cannot serve, a level or scale other than a fresh input's, and
        a ciphertext count that does not fit the mode."""
        payload = unframe(bytes(data), Kind.INPUT_CIPHERTEXT, self.digest, what="CKKS input")
        cts, head, _ = load_ciphertexts(ctx, payload, what="CKKS input")
        mode, n = head.get("mode"), head.get("n")
        if mode not in MODES or not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise KeyMismatchError("CKKS input: its header has no valid mode and sample count")
        self.check_keys(ctx, (mode,))
        if cts[0].level != ctx.top_level:
            raise KeyMismatchError(
                f"CKKS input at level {cts[0].level}; fresh inputs are at level {ctx.top_level}: "
                "encrypt the input anew with this model's client"
            )
        if mode == "single":
            per = self._single_in_chunks()
            if len(cts) != per or n != 1:
                raise InputError(f"CKKS input: {len(cts)} ciphertexts for {n} image(s) in mode single, "
                                 f"expected {per} for one image")
        else:
            self._batch_shape(n, len(cts))
        return mode, n, cts

    def _batch_shape(self, n: int, count: int) -> tuple[int, int]:
        """(ciphertexts per group, groups) of a batch input of `n` samples; refuses one of
        `count` ciphertexts that does not fit."""
        per = -(-self.program.n_batch_in // (self.slots // self.program.block))
        groups = -(-n // self.program.block)
        if count != per * groups:
            raise InputError(f"CKKS input: {count} ciphertexts for {n} samples, expected "
                             f"{per * groups} ({groups} group(s) of {per})")
        return per, groups

    def run(self, ctx: PublicContext, data: bytes) -> bytes:
        """Input blob (from CkksClient.encrypt) -> output blob (for CkksClient.decrypt)."""
        mode, n, cts = self.parse_input(ctx, data)
        ev = Evaluator(ctx)
        if mode == "single":
            out = self.single(ev, cts)
        else:
            block = self.program.block
            per, groups = self._batch_shape(n, len(cts))
            sizes = [min(block, n - g * block) for g in range(groups)]
            outs = self.batch(ev, [cts[g * per:(g + 1) * per] for g in range(groups)], sizes)
            out = [ct for group in outs for ct in group]
        body = dump_ciphertexts(ctx, out, {"mode": mode, "n": n})
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, body)

    # -- a batch across workers (byte level: the driver needs no keys) ---------------------
    def split_batch(self, data: bytes, parts: int) -> list[bytes]:
        """A batch input blob as at most `parts` input blobs of whole groups, in order, each
        for `run` on another worker; one image or one group stays whole. Only framing and
        counts are checked here: each worker's `run` checks its part in full."""
        payload = unframe(bytes(data), Kind.INPUT_CIPHERTEXT, self.digest, what="CKKS input")
        ctx_digest, head, extra, blobs = blob_parts(payload, what="CKKS input")
        mode, n, block = head.get("mode"), head.get("n"), self.program.block
        if mode != "batch" or not isinstance(n, int) or n <= block or parts < 2:
            return [bytes(data)]
        per, groups = self._batch_shape(n, len(blobs))
        out = []
        bounds = np.linspace(0, groups, min(parts, groups) + 1).round().astype(int)
        for lo, hi in pairwise(bounds):
            size = min(n, hi * block) - lo * block
            body = join_parts(ctx_digest, blobs[lo * per:hi * per], {"mode": "batch", "n": int(size)}, extra)
            out.append(frame(Kind.INPUT_CIPHERTEXT, self.digest, body))
        return out

    def merge_outputs(self, replies: list[bytes]) -> bytes:
        """The output blobs of `split_batch`'s parts, in order, as one output blob."""
        if len(replies) == 1:
            return bytes(replies[0])
        digests, blobs, n = set(), [], 0
        for reply in replies:
            payload = unframe(bytes(reply), Kind.OUTPUT_CIPHERTEXT, self.digest, what="CKKS output")
            ctx_digest, head, _, cts = blob_parts(payload, what="CKKS output")
            digests.add(ctx_digest)
            blobs += cts
            n += int(head.get("n", 0))
        if len(digests) != 1:
            raise KeyMismatchError("CKKS outputs of one batch made under different keys")
        body = join_parts(digests.pop(), blobs, {"mode": "batch", "n": n})
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, body)

    def _single_in_chunks(self) -> int:
        if self.program.single_kind == "replicated":
            return 1
        return -(-self.program.n_in // self.slots) if self.program.n_in > self.slots else 1

    def single(self, ev: Evaluator, cts: list[Ciphertext], start: int = 0) -> list[Ciphertext]:
        """One image through every stage from `start` (diagonal method)."""
        for k in range(start, len(self.program.stages)):
            cts = self._single_stage(ev, k, cts)
        return cts

    def _single_stage(self, ev: Evaluator, k: int, cts: list[Ciphertext],
                      mapped: list[Ciphertext] | None = None) -> list[Ciphertext]:
        """Stage k on one image; `mapped`: its matrix product, already computed (the sum of
        the workers' partial products)."""
        st, lm, sm, bias = self.program.stages[k], self._plan.maps[k], self._plan.sums[k], self._single_bias[k]
        if lm is not None:
            cts = mapped if mapped is not None else lm.apply(ev, cts, op=f"stage {st.source or '?'}")
            if sm is not None:
                cts = [ev.rotate_sum(ct, sm[0], sm[1]) for ct in cts]
            bias = bias + [None] * (len(cts) - len(bias))
            cts = [ev.add_plain(ct, b) if b is not None else ct for ct, b in zip(cts, bias)]
        if st.poly is not None:
            cts = [ev.polyval(ct, st.poly, op=f"activation after {st.source or '?'}") for ct in cts]
        return cts

    # -- one image's first matrix across workers -----------------------------------------
    def single_part(self, ctx: PublicContext, data: bytes, part: int, parts: int) -> bytes:
        """A worker's share of one image's first matrix: its giant steps' partial product
        (rescaled; the shares add up to the product), framed for `single_finish`."""
        mode, _, cts = self.parse_input(ctx, data)
        lm = self._plan.maps[0]
        if mode != "single" or lm is None or not 0 <= part < parts:
            raise InputError("a partial first matrix is for one image of a model whose first stage is a matrix")
        out = lm.apply(Evaluator(ctx), cts, op="first matrix (part)", part=(part, parts))
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest,
                     dump_ciphertexts(ctx, out, {"mode": "partial", "n": 1, "part": part}))

    def single_finish(self, ctx: PublicContext, parts: list[bytes]) -> bytes:
        """One image's output from the workers' `single_part` shares: their sum is the first
        matrix's product; the rest of the network runs here."""
        ev = Evaluator(ctx)
        total: list[Ciphertext] | None = None
        for i, blob in enumerate(parts):
            payload = unframe(bytes(blob), Kind.OUTPUT_CIPHERTEXT, self.digest, what="CKKS partial product")
            cts, head, _ = load_ciphertexts(ctx, payload, what="CKKS partial product")
            if head.get("mode") != "partial" or head.get("part") != i:
                raise KeyMismatchError(f"CKKS partial product {i}: not the share expected")
            total = cts if total is None else [ev.add(a, b) for a, b in zip(total, cts)]
        if total is None:
            raise InputError("no partial products to add")
        out = self._single_stage(ev, 0, [], mapped=total)
        out = self.single(ev, out, start=1)
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, dump_ciphertexts(ctx, out, {"mode": "single", "n": 1}))

    def batch(self, ev: Evaluator, groups: list[list[Ciphertext]],
              sizes: list[int]) -> list[list[Ciphertext]]:
        """Groups of up to `block` samples, SIMD (feature j of every sample of a group in one
        block of slots), every group through each stage together: each plaintext is encoded
        once and multiplies the matching ciphertext of every group (encoding costs more than a
        product, so a batch of several groups pays it once)."""
        block = self.program.block
        if len(groups) != len(sizes) or any(not 1 <= s <= block for s in sizes):
            raise InputError(f"CKKS batch: group sizes {sizes} do not fit blocks of {block}")
        mats = iter(batch_matrices(self.program, self.slots, block))
        for k, st in enumerate(self.program.stages):
            if st.weight is not None:
                _, _, baby = next(mats)
                packed = k == 0 and self.program.batch_complex
                groups = self._simd_linear(ev, groups, st.weight, st.bias, sizes, baby, packed)
            if st.poly is not None:
                op = f"activation after {st.source or '?'}"
                groups = [[ev.polyval(ct, st.poly, op=op) for ct in cts] for cts in groups]
        return groups

    def _simd_linear(self, ev: Evaluator, groups: list[list[Ciphertext]], w: np.ndarray,
                     bias: np.ndarray, sizes: list[int], baby: int,
                     packed: bool = False) -> list[list[Ciphertext]]:
        """y = W x + b on every group. Output chunk oc, block po reads input block
        (po + k) % per of every input chunk: out = sum_k rot_k(V_k * x) over block offsets k,
        computed as sum_j rot_{baby j}(sum_i U_{baby j + i} * rot_i(x)) (baby-step giant-step;
        U is V rotated by i blocks, in the clear). Slots past a group's last sample hold zeros
        (the client's padding) and keep them: the weights have no mask, the bias is added only
        where samples are. `packed`: a complex-packed input (see `simd_matrix`)."""
        block = self.program.block
        per = self.slots // block
        n_out = w.shape[0]
        table = simd_matrix(w, per, packed)  # (out chunks, block offsets, in chunks, per)
        in_chunks, out_chunks = len(groups[0]), table.shape[0]
        if table.shape[2] != in_chunks:
            raise InputError(f"CKKS batch: {in_chunks} input ciphertexts per group, the matrix "
                             f"reads {table.shape[2]}")
        flat = ev.align(*[ct for cts in groups for ct in cts])
        level = flat[0].level
        ev._need(level, 1, "a matrix on a batch")
        # rotated[g][ic][i]: input chunk ic of group g rotated left by i blocks
        rotated = [[[ct] + [ev.rotate(ct, i * block) for i in range(1, baby)]
                    for ct in flat[g * in_chunks:(g + 1) * in_chunks]] for g in range(len(groups))]
        sealev = ev.context.evaluator
        b = np.zeros(out_chunks * per)
        b[:n_out] = bias
        outs: list[list[Ciphertext]] = [[] for _ in groups]
        for oc in range(out_chunks):
            totals: list[Any] = [None] * len(groups)
            for j in range(per // baby):
                inner: list[Any] = [None] * len(groups)
                for i in range(baby):
                    weights = table[oc, baby * j + i]  # (in_chunks, per)
                    for ic in np.flatnonzero(np.any(weights != 0, axis=1)):
                        vec = np.roll(np.repeat(weights[ic], block), baby * j * block)
                        plain = ev.encode_for_product(vec, level)
                        for g in range(len(groups)):
                            prod = ev.mul_encoded(rotated[g][ic][i], plain, rescale=False)
                            if inner[g] is None:
                                inner[g] = prod
                            else:
                                sealev.add_inplace(inner[g].seal, prod.seal)
                for g in range(len(groups)):
                    if inner[g] is None:
                        continue
                    part = ev.rotate(inner[g], baby * j * block) if j else inner[g]
                    if totals[g] is None:
                        totals[g] = part
                    else:
                        sealev.add_inplace(totals[g].seal, part.seal)
            bias_vec: dict[int, np.ndarray] = {}
            chunk_bias = b[oc * per:(oc + 1) * per]
            for g, size in enumerate(sizes):
                if packed and totals[g] is not None:
                    sealev.add_inplace(totals[g].seal, ev.conjugate(totals[g]).seal)
                out = ev.zeros(level - 1) if totals[g] is None else ev.rescale(totals[g].seal)
                if np.any(chunk_bias):
                    if size not in bias_vec:
                        mask = np.zeros(block)
                        mask[:size] = 1.0
                        bias_vec[size] = (chunk_bias[:, None] * mask[None, :]).ravel()
                    out = ev.add_plain(out, bias_vec[size])
                outs[g].append(out)
        return outs

    def _bias_vectors(self, st: Any, layout: np.ndarray) -> list[np.ndarray | None]:
        if st.weight is None:
            return []
        if self._plan.kind == "replicated":  # the output repeats with period m_pad
            m = st.weight.shape[0]
            period = 1 << max(0, (m - 1).bit_length())
            one = np.zeros(period)
            one[:m] = st.bias
            return [np.tile(one, self.slots // period) if np.any(one) else None]
        chunks = int(layout.max()) // self.slots + 1
        vecs: list[np.ndarray | None] = []
        flat = layout.ravel()
        for c in range(chunks):
            sel = flat // self.slots == c
            if not np.any(st.bias[sel]):
                vecs.append(None)
                continue
            v = np.zeros(self.slots)
            v[flat[sel] % self.slots] = st.bias[sel]
            vecs.append(v)
        return vecs
