"""Compilation as named passes over the graph, each graph -> graph with a check of its result.

`run_passes` runs them in order; a failure names the pass, the passes that ran before it and
(through the error itself) the node. The float-graph passes live here:

    drop_final_softmax      a final Softmax/LogSoftmax leaves the argmax unchanged: drop it, say so
    fold_affine             constant scale/shift (batch norm, Sub/Div normalisation, Mul/Add by a
                            constant) folded into the neighbouring Gemm or Conv
    fuse_univariate         every elementwise subgraph that depends on one tensor (x*x, x*sigmoid(x),
                            the Erf pattern of Gelu, act -> affine -> act) becomes one `act` node:
                            one table lookup in TFHE
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gravel.compiler.ir import Graph, Node, conv2d
from gravel.errors import ModelError

__all__ = ["CANONICAL", "Pass", "canonicalise", "run_passes"]


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Any], Any]


def run_passes(graph: Any, passes: list[Pass], check: Callable[[Any], None] | None = None) -> Any:
    """Run `passes` in order, checking the graph after each (`check`, default `graph.check()`)."""
    done: list[str] = []
    for p in passes:
        try:
            graph = p.run(graph)
            (check or (lambda g: g.check()))(graph)
        except ModelError as exc:
            before = ", ".join(done) or "none"
            raise ModelError(f"pass '{p.name}' failed (after: {before}): {exc}") from exc
        done.append(p.name)
    return graph


# ------------------------------------------------------------------ helpers


def _replace_uses(graph: Graph, old: str, new: str) -> None:
    for n in graph.nodes:
        if old in n.inputs:
            n.inputs = tuple(new if i == old else i for i in n.inputs)
    if graph.output == old:
        graph.output = new


def _full(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), shape).copy()


# ------------------------------------------------------------------ drop_final_softmax


def drop_final_softmax(graph: Graph) -> Graph:
    g = graph.copy()
    while g.node(g.output).op == "softmax":
        node = g.node(g.output)
        g.output = node.inputs[0]
        g.notes.append(f"dropped the final Softmax at '{node.source or node.name}': the argmax is unchanged, "
                       "so the model's outputs are its logits")
    for n in g.nodes:
        if n.op == "softmax" and n.name != g.output:
            users = g.consumers()[n.name]
            if users:
                raise ModelError(f"{n.where}: a Softmax inside the network is not supported (only a final one)")
    g.prune()
    return g


# ------------------------------------------------------------------ fold_affine


def _fold_after(g: Graph, lin: Node, aff: Node) -> bool:
    """linear -> affine: per-output-channel constants scale the weights and bias."""
    shape = g.shapes[lin.name]
    s = _full(aff.attrs["scale"], shape)
    t = _full(aff.attrs["shift"], shape)
    channel_axis = 0 if lin.op == "conv" else len(shape) - 1
    other = tuple(i for i in range(len(shape)) if i != channel_axis)
    s_c = s.mean(axis=other) if other else s
    if not np.allclose(s, np.expand_dims(s_c, other) if other else s_c):
        return False
    w = lin.attrs["weight"]
    lin.attrs["weight"] = w * s_c.reshape((-1,) + (1,) * (w.ndim - 1))
    bias = np.asarray(lin.attrs["bias"], dtype=np.float64)
    if bias.ndim == 1:
        bias = bias.reshape((-1,) + (1,) * (len(shape) - 1)) if lin.op == "conv" else bias
    new_bias = _full(bias, shape) * s + t
    lin.attrs["bias"] = _compact_bias(new_bias, lin.op)
    _replace_uses(g, aff.name, lin.name)
    g.nodes.remove(aff)
    return True


def _compact_bias(bias: np.ndarray, op: str) -> np.ndarray:
    """A full-shape bias as (O,) where it is constant over positions, else as is."""
    channel_axis = 0 if op == "conv" else bias.ndim - 1
    other = tuple(i for i in range(bias.ndim) if i != channel_axis)
    per_channel = bias.mean(axis=other) if other else bias
    if not other or np.allclose(bias, np.expand_dims(per_channel, other)):
        return per_channel
    return bias


def _fold_before(g: Graph, aff: Node, lin: Node, path: list[Node]) -> bool:
    """affine -> (reshape ...) -> linear: constants on the linear op's input features."""
    in_shape = g.shapes[aff.name]
    s = _full(aff.attrs["scale"], in_shape)
    t = _full(aff.attrs["shift"], in_shape)
    for r in path:  # carry the constants through the reshapes/transposes in between
        if r.op == "reshape":
            s, t = s.reshape(r.attrs["shape"]), t.reshape(r.attrs["shape"])
        else:
            s, t = np.transpose(s, r.attrs["perm"]), np.transpose(t, r.attrs["perm"])
    x_shape = s.shape
    w = lin.attrs["weight"]
    if lin.op == "gemm":
        s_f = s.reshape(-1, x_shape[-1]).mean(axis=0)
        if not np.allclose(s, np.broadcast_to(s_f, x_shape)):
            return False
        new_w = w * s_f[None, :]
        bias = t @ w.T + lin.attrs["bias"]  # (..., out)
    else:
        s_c = s.reshape(x_shape[0], -1).mean(axis=1)
        if not np.allclose(s, s_c.reshape(-1, 1, 1) * np.ones(x_shape)):
            return False
        group = int(lin.attrs.get("group", 1))
        cg = w.shape[1]
        per_w = s_c.reshape(group, 1, cg)  # input channel of weight column j in group g
        o = w.shape[0]
        new_w = (w.reshape(group, o // group, cg, *w.shape[2:]) * per_w[..., None, None]).reshape(w.shape)
        # the shift, zero-padded exactly like the input, through the original convolution
        probe = Node("probe", "conv", ("x",), dict(lin.attrs, weight=w, bias=np.asarray(lin.attrs["bias"])))
        bias_b = np.asarray(lin.attrs["bias"])
        probe.attrs["bias"] = bias_b if bias_b.ndim == 1 else np.zeros(o)
        bias = conv2d(t[None], probe)[0]
        if bias_b.ndim != 1:
            bias = bias + bias_b
    lin.attrs["weight"] = new_w
    lin.attrs["bias"] = _compact_bias(np.asarray(bias, dtype=np.float64), lin.op)
    first = path[0] if path else lin
    first.inputs = tuple(aff.inputs[0] if i == aff.name else i for i in first.inputs)
    g.nodes.remove(aff)
    return True


def fold_affine(graph: Graph) -> Graph:
    g = graph.copy()
    g.check()
    changed = True
    while changed:
        changed = False
        users = g.consumers()
        for aff in list(g.nodes):
            if aff.op != "affine":
                continue
            src = g.node(aff.inputs[0])
            # binarized weights must stay +-1: their batch norm becomes the quantizer's exact threshold
            if src.op in ("gemm", "conv") and len(users[src.name]) == 1 and src.attrs.get("w_bits") != 1:
                if _fold_after(g, src, aff):
                    changed = True
                    break
            outs = users[aff.name]
            if len(outs) != 1 or aff.name == g.output:
                continue
            path: list[Node] = []
            nxt = outs[0]
            while nxt.op in ("reshape", "transpose") and len(users[nxt.name]) == 1 and nxt.name != g.output:
                path.append(nxt)
                nxt = users[nxt.name][0]
            if nxt.op in ("gemm", "conv") and nxt.attrs.get("w_bits") != 1 and _fold_before(g, aff, nxt, path):
                changed = True
                break
        if changed:
            g.check()
    return g


# ------------------------------------------------------------------ fuse_univariate

_ELEMENTWISE = ("act", "affine", "add", "sub", "mul")


def _step(node: Node, index: dict[str, int], root: str) -> dict[str, Any]:
    args = [0 if i == root else index[i] for i in node.inputs]
    if node.op == "act":
        return {"fn": node.attrs["fn"], "params": dict(node.attrs.get("params") or {}), "args": args}
    if node.op == "affine":
        return {"fn": "affine", "scale": node.attrs["scale"], "shift": node.attrs["shift"], "args": args}
    return {"fn": node.op, "args": args}


def fuse_univariate(graph: Graph) -> Graph:
    """Each elementwise node whose value depends on a single tensor `r` through elementwise
    operations only is a univariate function of `r`: one table lookup. Regions holding only
    constant affines are left alone (the quantizer absorbs them for free)."""
    g = graph.copy()
    g.check()
    root: dict[str, str] = {}  # elementwise node -> the tensor it is a function of
    for n in g.nodes:
        if n.op not in _ELEMENTWISE:
            continue
        if n.op == "act" and ("bits" in n.attrs or "clip" in n.attrs):
            continue  # a QAT quantizer fixes its own output: it stays a node of its own
        roots = {root.get(i, i) for i in n.inputs}
        if n.op in ("add", "sub", "mul") and len(roots) != 1:
            continue
        if n.op in ("act", "affine") or len(roots) == 1:
            root[n.name] = roots.pop()
    users = g.consumers()
    exits = [
        n for n in g.nodes
        if n.name in root
        and (n.name == g.output or any(root.get(u.name) != root[n.name] for u in users[n.name]))
    ]
    for ex in exits:
        r = root[ex.name]
        stack = [ex.name]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen or name == r:
                continue
            seen.add(name)
            stack.extend(g.node(name).inputs)
        members = [n for n in g.nodes if n.name in seen]
        if len(members) == 1 and members[0].op in ("act", "affine"):
            continue  # already one node
        if all(m.op == "affine" for m in members):
            continue
        index: dict[str, int] = {}
        steps = []
        for m in members:
            steps.append(_step(m, index, r))
            index[m.name] = len(steps)
        sources = ",".join(m.source or m.name for m in members)
        ex.op, ex.inputs = "act", (r,)
        ex.attrs = {"fn": "composite", "params": {"steps": steps}}
        ex.source = sources if len(sources) < 120 else sources[:117] + "..."
    g.prune()
    return g


CANONICAL = [
    Pass("drop_final_softmax", drop_final_softmax),
    Pass("fold_affine", fold_affine),
    Pass("fuse_univariate", fuse_univariate),
]


def canonicalise(graph: Graph) -> Graph:
    """The float-graph passes, in order."""
    return run_passes(graph, CANONICAL)


def lookups_estimate(graph: Graph) -> int:
    """Table lookups if every act is one lookup per element (before quantization)."""
    return sum(math.prod(graph.shapes[n.name]) for n in graph.nodes if n.op == "act")
