"""The compute party of a CKKS model: evaluation from a public context only.

It receives the client's public context (relinearisation and Galois keys, no secret key) and
input ciphertexts, both framed with the model's digest, and returns output ciphertexts framed
the same way. Keys of another model, keys missing a rotation the plan needs, or parameters other
than the artifact's are refused before any work starts, naming what is wrong.

One image (mode "single"): every stage's matrix by the diagonal method (LinearMap, BSGS
rotations), whose encoded diagonals are kept after the first call. A batch (mode "batch"):
SIMD across images; each matrix costs one plaintext product per (input ciphertext, output
ciphertext, block offset), encoded as it is used (a batch's diagonals would not fit in memory).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gravel.ckks.blob import dump_ciphertexts, load_ciphertexts
from gravel.ckks.ciphertext import Ciphertext
from gravel.ckks.context import PublicContext
from gravel.ckks.evaluator import Evaluator
from gravel.ckks.params import CkksParams
from gravel.ckks.program import CkksProgram, single_plan
from gravel.errors import InputError, KeyMismatchError
from gravel.protocol.framing import Kind, frame, unframe

__all__ = ["MODES", "CkksServer", "check_public_context"]

MODES = ("single", "batch")


def check_public_context(ctx: PublicContext, params: CkksParams, steps: dict[str, list[int]],
                         modes: tuple[str, ...] | None = MODES) -> tuple[str, ...]:
    """Check a client's public context against a program's parameters and the rotation steps of
    each packing mode; returns the modes it serves. With `modes`, every one of them must be
    served; with None, at least one (a client may make keys for one packing only)."""
    if ctx.has_secret_key():
        raise KeyMismatchError("CKKS evaluation keys hold a secret key; refusing them")
    if ctx.params != params:
        raise KeyMismatchError(
            f"CKKS keys for parameters {ctx.params.to_json()}, this model needs "
            f"{params.to_json()}: make the keys from this model's artifact"
        )
    missing = {mode: [s for s in steps[mode] if not ctx.has_rotation(s)] for mode in MODES}
    for mode in modes or ():
        if missing[mode]:
            raise KeyMismatchError(_lacking(missing[mode], steps[mode], mode))
    served = tuple(m for m in MODES if not missing[m])
    if not served:
        raise KeyMismatchError(
            "CKKS evaluation keys serve neither packing of this model: they lack "
            + " and ".join(f"{len(missing[m])} of the {len(steps[m])} rotation steps of {m} inference "
                           f"({_few(missing[m])})" for m in MODES)
            + ": generate the keys with this model's client spec")
    return served


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
        check_public_context(ctx, self.program.params, self.rotation_steps(), modes)

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
            per = -(-self.program.n_in // (self.slots // self.program.block))
            groups = -(-n // self.program.block)
            if len(cts) != per * groups:
                raise InputError(f"CKKS input: {len(cts)} ciphertexts for {n} samples, expected "
                                 f"{per * groups} ({groups} group(s) of {per})")
        return mode, n, cts

    def run(self, ctx: PublicContext, data: bytes) -> bytes:
        """Input blob (from CkksClient.encrypt) -> output blob (for CkksClient.decrypt)."""
        mode, n, cts = self.parse_input(ctx, data)
        ev = Evaluator(ctx)
        if mode == "single":
            out = self.single(ev, cts)
        else:
            per = -(-self.program.n_in // (self.slots // self.program.block))
            out = []
            for g in range(-(-n // self.program.block)):
                size = min(self.program.block, n - g * self.program.block)
                out += self.batch(ev, cts[g * per:(g + 1) * per], size)
        body = dump_ciphertexts(ctx, out, {"mode": mode, "n": n})
        return frame(Kind.OUTPUT_CIPHERTEXT, self.digest, body)

    def _single_in_chunks(self) -> int:
        if self.program.single_kind == "replicated":
            return 1
        return -(-self.program.n_in // self.slots) if self.program.n_in > self.slots else 1

    def single(self, ev: Evaluator, cts: list[Ciphertext]) -> list[Ciphertext]:
        """One image through every stage (diagonal method)."""
        plan = self._plan
        for st, lm, sm, bias in zip(self.program.stages, plan.maps, plan.sums, self._single_bias):
            if lm is not None:
                cts = lm.apply(ev, cts, op=f"stage {st.source or '?'}")
                if sm is not None:
                    cts = [ev.rotate_sum(ct, sm[0], sm[1]) for ct in cts]
                bias = bias + [None] * (len(cts) - len(bias))
                cts = [ev.add_plain(ct, b) if b is not None else ct for ct, b in zip(cts, bias)]
            if st.poly is not None:
                cts = [ev.polyval(ct, st.poly, op=f"activation after {st.source or '?'}") for ct in cts]
        return cts

    def batch(self, ev: Evaluator, cts: list[Ciphertext], n: int) -> list[Ciphertext]:
        """Up to `block` samples, SIMD (feature j of every sample in one block of slots)."""
        block, slots = self.program.block, self.slots
        per = slots // block
        mask = np.zeros(block)
        mask[:n] = 1.0
        for st in self.program.stages:
            if st.weight is not None:
                cts = self._simd_linear(ev, cts, st.weight, st.bias, mask, per)
            if st.poly is not None:
                cts = [ev.polyval(ct, st.poly, op=f"activation after {st.source or '?'}") for ct in cts]
        return cts

    def _simd_linear(self, ev: Evaluator, cts: list[Ciphertext], w: np.ndarray, bias: np.ndarray,
                     mask: np.ndarray, per: int) -> list[Ciphertext]:
        block = len(mask)
        n_out, n_in = w.shape
        in_chunks, out_chunks = len(cts), -(-n_out // per)
        padded = np.zeros((out_chunks * per, in_chunks * per))
        padded[:n_out, :n_in] = w
        cts = ev.align(*cts)
        level = cts[0].level
        ev._need(level, 1, "a matrix on a batch")
        sealev = ev.context.evaluator
        po = np.arange(per)
        outs = []
        for oc in range(out_chunks):
            total = None
            for k in range(per):
                # out block po of chunk oc reads in block (po + k) % per of every input chunk
                rows = oc * per + po
                weights = padded[rows[None, :], (np.arange(in_chunks)[:, None] * per
                                                 + (po[None, :] + k) % per)]  # (in_chunks, per)
                inner = None
                for ic in np.flatnonzero(np.any(weights != 0, axis=1)):
                    vec = np.roll((weights[ic][:, None] * mask[None, :]).ravel(), k * block)
                    prod = ev.mul_encoded(cts[ic], ev.encode_for_product(vec, level), rescale=False)
                    if inner is None:
                        inner = prod
                    else:
                        sealev.add_inplace(inner.seal, prod.seal)
                if inner is None:
                    continue
                if k:
                    inner = ev.rotate(inner, k * block)
                if total is None:
                    total = inner
                else:
                    sealev.add_inplace(total.seal, inner.seal)
            out = ev.zeros(level - 1) if total is None else ev.rescale(total.seal)
            b = np.zeros(out_chunks * per)
            b[:n_out] = bias
            bvec = (b[oc * per:(oc + 1) * per][:, None] * mask[None, :]).ravel()
            outs.append(ev.add_plain(out, bvec) if np.any(bvec) else out)
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
