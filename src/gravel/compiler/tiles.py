"""Spatial tiles with a halo: several convolutional stages in one call per shard, no gather.

A channel-split stage (plan.py) needs every channel of the stage before it, so each stage ends
with a gather: every worker's output goes to every other worker. Convolutions need only nearby
rows. Where several consecutive stages are convolutional (Conv, pooling, padding, lookups,
residual joins, channel concatenation), they merge into one *tiled* stage: shard j computes rows
[r0, r1) of the last stage's output, starting from the rows of the first stage's inputs those
rows depend on (the tile plus a halo that grows by each convolution's reach). Halo rows are
computed by both neighbouring shards: lookups spent to save gathers. `group_tiles` merges stages
while that extra work stays under a limit; worth it where moving a stage's output between
machines costs more than the halo (slow or distant networks), not between workers on one host.

Rows here are the H axis of (C, H, W) tensors (after the batch axis, where there is one). A
window (lo, hi) is a half-open range of absolute rows of a node's full output.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from gravel.compiler.qgraph import QNode, run_node

__all__ = ["MAX_HALO_OVERHEAD", "group_tiles", "run_tile", "slowest_tile", "tile_lookups", "tile_notes",
           "tile_overhead", "tile_rows", "tileable"]

# the slowest tile of a merged stage may cost at most this much more than an even share
MAX_HALO_OVERHEAD = 0.15
_WINDOWED = ("linear", "maxpool", "sumpool")
_ROWWISE = ("lut", "add", "mul", "concat")

Window = tuple[int, int]


def _spatial(node: QNode) -> bool:
    """Whether a node's output rows depend only on a window of its inputs' rows."""
    if len(node.shape) != 3:
        return False
    if node.op in _WINDOWED:
        a = node.attrs
        return (node.op != "linear" or a.get("kind") == "conv") and len(a.get("in_shape", ())) == 3
    if node.op == "pad":
        return len(node.attrs["in_shape"]) == 3 and node.attrs["pads"][0] == node.attrs["pads"][3] == 0
    if node.op == "concat":
        return node.attrs["axis"] == 0
    return node.op in _ROWWISE


def tileable(nodes: list[QNode]) -> bool:
    return bool(nodes) and all(_spatial(n) for n in nodes)


def input_window(node: QNode, out: Window) -> Window:
    """The rows of the node's (first) input that output rows `out` read."""
    lo, hi = out
    a = node.attrs
    if node.op in _WINDOWED:
        h = a["in_shape"][1]
        kh, sh, dh, top = a["kernel"][0], a["strides"][0], a["dilations"][0], a["pads"][0]
        return max(0, lo * sh - top), min(h, (hi - 1) * sh - top + (kh - 1) * dh + 1)
    if node.op == "pad":
        h, top = a["in_shape"][1], a["pads"][1]
        return max(0, lo - top), max(0, min(h, hi - top))
    return out


def windows(nodes: list[QNode], output: str, rows: Window) -> dict[str, Window]:
    """Per tensor (the stage's nodes and the inputs it reads), the rows a tile computing `rows`
    of `output` needs: the union over its readers, back from the output."""
    need: dict[str, Window] = {output: rows}
    for node in reversed(nodes):
        if node.name not in need:
            continue
        w = input_window(node, need[node.name])
        for i in node.inputs:
            lo, hi = need.get(i, w)
            need[i] = (min(lo, w[0]), max(hi, w[1]))
    return need


def tile_rows(height: int, tiles: int) -> list[Window]:
    """`tiles` contiguous row ranges covering `height` rows, sizes differing by at most one."""
    bounds = [round(k * height / tiles) for k in range(tiles + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(tiles)]


def tile_lookups(nodes: list[QNode], output: str, rows: Window) -> int:
    """Lookups of one tile, halo included."""
    need = windows(nodes, output, rows)
    return sum(n.lookups * (need[n.name][1] - need[n.name][0]) // n.shape[1] for n in nodes if n.name in need)


def slowest_tile(nodes: list[QNode], output: str, tiles: int) -> int:
    """Lookups of the costliest of `tiles` row tiles of `output`, halo included: what a worker
    waits for (the plan's lookups per shard, the halo limit's measure)."""
    return max(tile_lookups(nodes, output, rows) for rows in tile_rows(next(
        n.shape[1] for n in nodes if n.name == output), tiles))


def tile_overhead(nodes: list[QNode], output: str, tiles: int) -> float:
    """How much longer the slowest tile takes than an even share of the nodes' lookups (0 where
    they have none): the halo, and rows that do not divide evenly, both count."""
    total = sum(n.lookups for n in nodes)
    return slowest_tile(nodes, output, tiles) * tiles / total - 1.0 if total else 0.0


def _rows(x: Any, have: Window, want: Window, lead: int) -> Any:
    """Rows `want` of a tensor that holds rows `have`."""
    if want == have:
        return x
    a, b = want[0] - have[0], want[1] - have[0]
    return x[:, :, a:b] if lead else x[:, a:b]


def _local(node: QNode, out: Window, inp: Window) -> QNode:
    """The node computing output rows `out` from input rows `inp` (absolute): the same operator
    on a shorter input, its top padding moved to where the tile starts."""
    a = _row_attrs(node.attrs, node.shape[1], out)  # per-position constants (a conv's bias next to padding)
    shape = (node.shape[0], out[1] - out[0], *node.shape[2:])
    if node.op in _WINDOWED:
        c, _, w = a["in_shape"]
        top = a["pads"][0] - out[0] * a["strides"][0] + inp[0]
        pads = (top, *a["pads"][1:])  # the bottom padding is read where the shorter input ends
        return replace(node, attrs={**a, "in_shape": (c, inp[1] - inp[0], w), "pads": pads}, shape=shape)
    if node.op == "pad":
        c, _, w = a["in_shape"]
        p = list(a["pads"])
        p[1] = p[1] + inp[0] - out[0]
        p[4] = (out[1] - out[0]) - p[1] - (inp[1] - inp[0])
        return replace(node, attrs={**a, "in_shape": (c, inp[1] - inp[0], w), "pads": tuple(p)}, shape=shape)
    return replace(node, attrs=a, shape=shape)


def _row_attrs(attrs: dict[str, Any], height: int, out: Window) -> dict[str, Any]:
    """Per-element constants (a lookup's parameters of shape (C, H, W)) cut to rows `out`."""

    def cut(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, np.ndarray) and v.ndim == 3 and v.shape[1] == height and height > 1:
            return v[:, out[0] : out[1]]
        return v

    return {k: cut(v) for k, v in attrs.items()}


def run_tile(nodes: list[QNode], output: str, values: dict[str, Any], rows: Window, backend: Any) -> Any:
    """Rows `rows` of `output`, from `values` (the full tensors the nodes read from outside)."""
    need = windows(nodes, output, rows)
    have: dict[str, tuple[Any, Window]] = {name: (v, (0, _height(v, backend))) for name, v in values.items()}
    for node in nodes:
        if node.name not in need:
            continue
        out = need[node.name]
        inp = input_window(node, out)
        args = [_rows(*have[i], inp, backend.lead) for i in node.inputs]
        have[node.name] = (run_node(_local(node, out, inp), args, backend), out)
    x, got = have[output]
    return _rows(x, got, rows, backend.lead)


def _height(x: Any, backend: Any) -> int:
    return int(x.shape[backend.lead + 1])


def group_tiles(stages: list[Any], tiles: int, max_overhead: float = MAX_HALO_OVERHEAD) -> list[list[int]]:
    """Runs of two or more consecutive stages (indices) to merge into tiled stages of `tiles`
    shards, longest first from each start: convolutional stages, only the last read by stages
    after the run, at least `tiles` rows high at its end, whose halo costs at most
    `max_overhead` of the run's lookups. The output stage is never tiled (the client decrypts
    one output)."""
    if tiles < 2:
        return []
    groups: list[list[int]] = []
    i = 0
    while i < len(stages) - 1:
        end = i
        while end + 1 < len(stages) - 1 and _tile_candidate(stages[end + 1], tiles):
            end += 1
        best = None
        if _tile_candidate(stages[i], tiles):
            for j in range(end, i, -1):
                run = list(range(i, j + 1))
                if _closed(stages, run) and _overhead(stages, run, tiles) <= max_overhead:
                    best = run
                    break
        if best:
            groups.append(best)
            i = best[-1] + 1
        else:
            i += 1
    return groups


def _tile_candidate(stage: Any, tiles: int) -> bool:
    return tileable(stage.nodes) and not stage.tail and stage.output.shape[1] >= tiles


def _closed(stages: list[Any], run: list[int]) -> bool:
    """Only the run's last stage is read by stages after it."""
    inner = {stages[k].name for k in run[:-1]}
    return all(i not in inner for s in stages[run[-1] + 1 :] for i in s.inputs)


def _overhead(stages: list[Any], run: list[int], tiles: int) -> float:
    """`tile_overhead` of the stages `run` merged."""
    return tile_overhead([n for k in run for n in stages[k].nodes], stages[run[-1]].output.name, tiles)


def tile_notes(stages: list[Any], tiles: int) -> list[str]:
    """One line per tiled stage for the compile notes: what merged and what its halo costs."""
    notes = []
    for st in stages:
        if st.tiles and tiles >= st.tiles:
            extra = tile_overhead(st.nodes, st.output.name, st.tiles)
            notes.append(f"{st.name} ({', '.join(dict.fromkeys(n.source for n in st.nodes if n.lookups))}) runs "
                         f"in {st.tiles} row tiles with a halo: {st.merged} stages in one call per shard, "
                         f"{st.merged - 1} fewer gather{'s' if st.merged > 2 else ''}, its slowest tile {100 * extra:.0f} % "
                         f"over an even share (the halo)")
    return notes
