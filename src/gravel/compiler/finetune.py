"""Fine-tuning the integer program with its quantization in place (quantization-aware training
after the fact, for any imported model).

Post-training quantization rounds every weight, every activation and every accumulator before
its table lookup; on convolutional networks the last of these loses most (an accumulator of
13 bits rounded to a 6-bit lookup leaves about as many input levels in the activation's active
range as it has output levels). A few epochs of training with all of that in place recover it,
the way a QAT recipe would, but on the program the compiler made, so it works for an ONNX file
as well as an nn.Module, and what is trained is exactly what the server evaluates.

The program runs in torch through `qgraph.run_node` itself (`TorchBackend`: the node semantics
have one owner): integer weights and biases become float parameters rounded on the way in
(straight-through), the accumulator rounding is straight-through, and each table lookup gives
its exact output forward and, backward, the derivative of the function it tabulates (times its
input and output scales; zero where the output is clipped). Scales, offsets, tables and the
rounding of every lookup stay as calibrated; afterwards every node's range is measured again on
the calibration set, and a lookup whose accumulator grew wider than its rounding keeps removes
more bits so that its lookup width (what its cost depends on) is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gravel.compiler.ir import activation
from gravel.compiler.qgraph import QGraph, QNode, run_node, signed_width
from gravel.errors import InputError

__all__ = ["FINETUNE_SAMPLES", "FinetuneResult", "TorchBackend", "check_finetune_data", "finetune_qgraph",
           "minibatches"]

# training samples the commands fine-tune on (either backend): a few epochs of these are plenty
FINETUNE_SAMPLES = 10_000


@dataclass(frozen=True)
class FinetuneResult:
    """What fine-tuning did, for the notes and `gravel check`."""

    samples: int
    epochs: int
    accuracy_before: float  # the integer program on the fine-tuning samples
    accuracy_after: float
    best_epoch: int  # 0: no epoch did better, the program is unchanged
    history: tuple[float, ...] = ()  # accuracy after each epoch
    refused: str = ""  # why the fine-tuned weights were not kept, where they were not

    def note(self) -> str:
        if self.refused:
            return (f"fine-tuning ({self.epochs} epochs on {self.samples} samples) not kept: {self.refused}; "
                    "the program stands as quantized")
        if self.best_epoch == 0:
            return (f"fine-tuning ({self.epochs} epochs on {self.samples} samples) did not improve the "
                    f"quantized program ({100 * self.accuracy_before:.1f} %): kept as quantized")
        return (f"fine-tuned the quantized program {self.best_epoch} of {self.epochs} epochs on {self.samples} "
                f"labelled samples: accuracy there {100 * self.accuracy_before:.1f} % -> "
                f"{100 * self.accuracy_after:.1f} %")


class TorchBackend:
    """`run_node`'s operations on a torch batch (leading axis = samples), differentiable:
    rounding is straight-through and a lookup's gradient is its function's derivative."""

    lead = 1

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._lookup = _lookup_function()

    def round(self, a: Any, lsbs: int, exact: bool = True) -> Any:
        if lsbs == 0:
            return a
        step = float(2**lsbs)
        return a + (self.torch.floor((a + step / 2) / step) * step - a).detach()

    def lut(self, fn: Callable[[Any], Any], a: Any) -> Any:
        return self._lookup.apply(a, fn)

    def maximum(self, a: Any, b: Any) -> Any:
        return self.torch.maximum(a, b)

    def concat(self, parts: Sequence[Any], axis: int) -> Any:
        return parts[0] if len(parts) == 1 else self.torch.cat(tuple(parts), dim=axis + self.lead)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        return x.permute(*perm)

    def sum(self, x: Any, axis: int) -> Any:
        return x.sum(dim=axis)

    def zeros_like_tail(self, x: Any, n: int) -> Any:
        return self.torch.zeros(x.shape[:-1] + (n,), dtype=x.dtype)


def _slope(attrs: dict[str, Any], a: np.ndarray) -> np.ndarray:
    """d(output level)/d(accumulator) of a lookup at accumulator values `a`: the tabulated
    function's derivative (central difference) times s_in / s_out, zero where clipped."""
    f = activation(attrs["fn"], attrs.get("params"))
    s_in, o_in = np.asarray(attrs["in_scale"]), np.asarray(attrs["in_offset"])
    s_out, o_out = float(attrs["out_scale"]), float(attrs["out_offset"])
    u = a * s_in + o_in
    h = np.maximum(np.abs(s_in) * 2.0 ** int(attrs.get("lsbs", 0)), 1e-6)  # one rounding step
    d = (np.asarray(f(u + h), dtype=np.float64) - np.asarray(f(u - h), dtype=np.float64)) / (2 * h)
    level = (np.asarray(f(u), dtype=np.float64) - o_out) / s_out
    inside = (level >= int(attrs["qmin"]) - 0.5) & (level <= int(attrs["qmax"]) + 0.5)
    return np.where(inside, d * s_in / s_out, 0.0)


def _lookup_function() -> Any:
    """A table lookup as a torch function: its exact table forward, `_slope` backward."""
    import torch

    class Lookup(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, a: Any, fn: Callable[[Any], Any]) -> Any:  # type: ignore[override]
            values = a.detach().cpu().numpy().astype(np.int64)
            ctx.save_for_backward(a)
            ctx.fn = fn
            return torch.from_numpy(np.asarray(fn(values), dtype=np.float64)).to(a.dtype)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            (a,) = ctx.saved_tensors
            slope = _slope(ctx.fn.attrs, a.detach().cpu().numpy().astype(np.float64))
            return grad * torch.from_numpy(slope).to(grad.dtype), None

    return Lookup


def _linear_mask(node: QNode) -> np.ndarray:
    """Which entries of a linear node's weight matrix exist (a grouped convolution's matrix is
    block diagonal: the zeros outside its blocks must stay zeros)."""
    w = np.asarray(node.attrs["weight"])
    group = int(node.attrs.get("group", 1))
    if node.attrs["kind"] != "conv" or group == 1:
        return np.ones(w.shape, dtype=bool)
    c = int(node.attrs["in_shape"][0])
    k = w.shape[0] // c
    o = w.shape[1]
    cg, og = c // group, o // group
    mask = np.zeros((c, k, o), dtype=bool)
    for g in range(group):
        mask[g * cg:(g + 1) * cg, :, g * og:(g + 1) * og] = True
    return mask.reshape(w.shape)


def _weight_limit(node: QNode) -> int:
    """The largest |weight| fine-tuning may give a linear node: its bit width's, or what it
    already holds (a Gemm/Conv feeding a residual join takes a scale that can exceed it)."""
    top = int(np.abs(np.asarray(node.attrs["weight"])).max(initial=0))
    return max(1, 2 ** (int(node.attrs.get("w_bits", 8)) - 1) - 1, top)


def _trainable(graph: QGraph, max_integer_bits: int) -> list[QNode]:
    """Linear nodes to train: not binarized ones (they compute with signs), nor those whose
    accumulator already fills concrete's integers (trained weights would overflow them)."""
    return [n for n in graph.nodes if n.op == "linear" and int(n.attrs.get("w_bits", 8)) > 1
            and signed_width(n.lo, n.hi) < max_integer_bits]


def _forward(graph: QGraph, backend: TorchBackend, params: dict[str, tuple[Any, Any, Any, int]], q: Any,
             limits: dict[str, float] | None = None) -> Any:
    """Logits of the program on quantized inputs `q`, weights from `params`; with `limits`,
    also how far the integers of linear nodes and sums pass theirs (a penalty that keeps
    trained weights from outgrowing concrete's integers)."""
    torch = backend.torch
    values: dict[str, Any] = {}
    excess = torch.zeros(())
    for node in graph.nodes:
        if node.op == "input":
            values[node.name] = q
            continue
        args = [values[i] for i in node.inputs]
        if node.op == "linear":
            w, b, mask, qmax = params[node.name]
            if w.requires_grad:
                w = torch.clamp(w + (torch.round(w) - w).detach(), -qmax, qmax) * mask
                b = b + (torch.round(b) - b).detach()
            values[node.name] = run_node(node, args, backend, w, b)
        else:
            values[node.name] = run_node(node, args, backend)
        if limits is not None and node.name in limits:
            # the batch's largest integer there, past its limit (a strong pull: one value over
            # concrete's width wraps in FHE)
            excess = excess + 100.0 * torch.relu(values[node.name].abs().max() / limits[node.name] - 1.0)
    out = values[graph.output].reshape(len(q), -1)
    logits = out * torch.from_numpy(graph.output_scale).to(out.dtype) + torch.from_numpy(graph.output_offset).to(out.dtype)
    return logits if limits is None else (logits, excess)


class _Widened(Exception):
    """A lookup's accumulator would need more bits than its rounding was planned for."""


def _remeasure(graph: QGraph, calib_q: np.ndarray) -> None:
    """Every node's range on the calibration set after the weights changed. A lookup's
    rounding stays as trained, so an accumulator that grew past the width it was planned for
    (more bits to remove, a coarser lookup than the one trained) raises _Widened."""
    values = graph.forward_int(calib_q, keep=True)
    for node in graph.nodes:
        v = values[node.name]
        node.lo, node.hi = int(v.min()), int(v.max())
    for node in graph.nodes:
        if node.op == "lut":
            src = graph.node(node.inputs[0])
            if signed_width(src.lo, src.hi) > int(node.attrs["acc_bits"]):
                raise _Widened(node.name)


def _limits(graph: QGraph, max_integer_bits: int) -> dict[str, float]:
    """How large each linear node's and sum's integers may grow while training: 80 % of
    concrete's range (or as wide as calibration found them, where that is more), and for an
    accumulator a lookup reads, within the width its rounding was planned for."""
    top = 2.0 ** (max_integer_bits - 1)
    widest = {n.name: float(max(abs(n.lo), abs(n.hi))) for n in graph.nodes}
    limits = {n.name: min(max(0.8 * top, widest[n.name]), 0.97 * top)
              for n in graph.nodes if n.op in ("linear", "add", "sumpool")}
    for n in graph.nodes:
        src = n.inputs[0] if n.op == "lut" else None
        if src in limits:
            planned = 2.0 ** (int(n.attrs["acc_bits"]) - 1)
            limits[src] = min(limits[src], max(0.95 * planned, widest[src]))
    return limits


def check_finetune_data(x: np.ndarray, y: np.ndarray, epochs: int) -> np.ndarray:
    """The labels as integers, once the samples and epochs make sense for fine-tuning (either
    backend's); a clear error otherwise."""
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y) or len(x) < 2:
        raise InputError(f"fine-tuning needs labelled samples: {len(x)} inputs, {len(y)} labels")
    if epochs < 1:
        raise InputError(f"fine-tuning needs at least one epoch, got {epochs}")
    return y


def minibatches(torch: Any, n: int, batch_size: int) -> Any:
    """One epoch's shuffled index batches over `n` samples (either backend's fine-tuning)."""
    order = torch.randperm(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def finetune_qgraph(graph: QGraph, x: np.ndarray, y: np.ndarray, calib_x: np.ndarray, epochs: int = 3,
                    lr: float = 0.02, batch_size: int = 64, seed: int = 0, max_integer_bits: int = 16,
                    progress: bool = False) -> FinetuneResult:
    """Train `graph`'s integer weights and biases in place on labelled samples `x`, `y`
    (cross-entropy on its dequantized logits), keeping the epoch most accurate on them whose
    integers, measured again on `calib_x`, still fit `max_integer_bits` (or the program as it
    was, when no epoch beats it).

    `lr` is in integer weight steps: Adam moves each weight by about that much per step, so a
    weight crosses a rounding boundary after a few dozen steps where the gradient insists."""
    import torch

    from gravel.compiler.quantize import conform_batch

    x = np.asarray(x)
    y = check_finetune_data(x, y, epochs)

    torch.manual_seed(seed)
    backend = TorchBackend()
    q_all = graph.quantize_input(conform_batch(x, graph.input_shape)).astype(np.float32)
    calib_q = graph.quantize_input(conform_batch(calib_x, graph.input_shape))
    nodes = _trainable(graph, max_integer_bits)
    params = {  # every linear node's weights as torch tensors; only the trainable ones learn
        n.name: (torch.tensor(np.asarray(n.attrs["weight"], dtype=np.float32), requires_grad=n in nodes),
                 torch.tensor(np.asarray(n.attrs["bias"], dtype=np.float32), requires_grad=n in nodes),
                 torch.from_numpy(_linear_mask(n).astype(np.float32)),
                 _weight_limit(n))
        for n in graph.nodes if n.op == "linear"
    }
    trained = [t for n in nodes for t in params[n.name][:2]]
    if not trained:
        return FinetuneResult(len(x), epochs, 0.0, 0.0, 0, (), "no layer has trainable weights")
    opt = torch.optim.Adam(trained, lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # settles the weights at the end
    limits = _limits(graph, max_integer_bits)
    xt, yt = torch.from_numpy(q_all), torch.from_numpy(y)

    def accuracy() -> float:
        with torch.no_grad():
            preds = [_forward(graph, backend, params, xt[i:i + 500]).argmax(1) for i in range(0, len(xt), 500)]
        return float((torch.cat(preds) == yt).float().mean())

    def snapshot() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for n in nodes:
            w, b, mask, qmax = params[n.name]
            wi = np.clip(np.round(w.detach().numpy()), -qmax, qmax) * mask.numpy()
            out[n.name] = (np.ascontiguousarray(wi.astype(np.int64)), np.round(b.detach().numpy()).astype(np.int64))
        return out

    before = accuracy()
    history: list[float] = []
    better: list[tuple[float, int, dict[str, tuple[np.ndarray, np.ndarray]]]] = []  # epochs that beat `before`
    iterator: Any = range(1, epochs + 1)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="fine-tuning the quantized program", unit="epoch")
    for epoch in iterator:
        for idx in minibatches(torch, len(xt), batch_size):
            opt.zero_grad()
            logits, excess = _forward(graph, backend, params, xt[idx], limits)
            loss = torch.nn.functional.cross_entropy(logits, yt[idx]) + excess
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy()
        history.append(acc)
        if progress:
            iterator.set_postfix(accuracy=f"{acc:.4f}", before=f"{before:.4f}")
        if acc > before:
            better.append((acc, epoch, snapshot()))
    # the best epoch whose integers still fit concrete's (a layer's accumulator, or the sum a
    # pooling feeds the next one, can grow as the weights move), else the program as it was
    originals = {n.name: (n.attrs["weight"], n.attrs["bias"]) for n in nodes}
    rounding = {n.name: dict(n.attrs) for n in graph.nodes if n.op == "lut"}
    refused = ""
    for acc, epoch, weights in sorted(better, key=lambda t: -t[0]):
        for n in nodes:
            n.attrs["weight"], n.attrs["bias"] = weights[n.name]
        try:
            _remeasure(graph, calib_q)
            widest = max(graph.nodes, key=lambda n: signed_width(n.lo, n.hi))
            width = signed_width(widest.lo, widest.hi)
            refused = (f"{widest.where} would need {width}-bit integers (concrete's hold {max_integer_bits})"
                       if width > max_integer_bits else "")
        except _Widened as exc:
            refused = f"the accumulator of lookup '{exc}' would outgrow its planned rounding"
        if not refused:
            return FinetuneResult(len(x), epochs, before, acc, epoch, tuple(history))
        for n in graph.nodes:  # undo this epoch's weights and any rounding it widened
            if n.op == "lut":
                n.attrs.clear()
                n.attrs.update(rounding[n.name])
    for n in nodes:
        n.attrs["weight"], n.attrs["bias"] = originals[n.name]
    _remeasure(graph, calib_q)
    return FinetuneResult(len(x), epochs, before, before, 0, tuple(history), refused)
