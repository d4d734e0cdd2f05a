"""Small float graphs built by hand, for tests of the passes that need no importer."""

from __future__ import annotations

import numpy as np

from gravel.compiler.ir import Graph, Node


def conv_attrs(rng: np.random.Generator, o: int, c: int, k: int = 3, pads=(1, 1, 1, 1), strides=(1, 1), group=1):
    return dict(weight=rng.normal(0, 0.4, (o, c // group, k, k)), bias=rng.normal(0, 0.1, o), strides=strides,
                pads=pads, dilations=(1, 1), group=group)


def residual_cnn(rng: np.random.Generator, c: int = 4) -> Graph:
    """norm -> conv -> bn -> relu -> conv -> bn -> (+ skip) -> relu -> maxpool -> flatten -> gemm."""
    bn = lambda: dict(scale=rng.uniform(0.5, 1.5, (c, 1, 1)), shift=rng.normal(0, 0.1, (c, 1, 1)))  # noqa: E731
    nodes = [
        Node("x", "input"),
        Node("norm", "affine", ("x",), dict(scale=1 / 0.3, shift=-0.5 / 0.3)),
        Node("c1", "conv", ("norm",), conv_attrs(rng, c, 1)),
        Node("b1", "affine", ("c1",), bn()),
        Node("r1", "act", ("b1",), dict(fn="relu")),
        Node("c2", "conv", ("r1",), conv_attrs(rng, c, c)),
        Node("b2", "affine", ("c2",), bn()),
        Node("add", "add", ("b2", "r1")),
        Node("r2", "act", ("add",), dict(fn="relu")),
        Node("mp", "maxpool", ("r2",), dict(kernel=(2, 2), strides=(2, 2))),
        Node("fl", "reshape", ("mp",), dict(shape=(c * 16,))),
        Node("fc", "gemm", ("fl",), dict(weight=rng.normal(0, 0.3, (10, c * 16)), bias=rng.normal(0, 0.1, 10))),
        Node("sm", "softmax", ("fc",), dict(axis=0)),
    ]
    g = Graph(nodes, "sm", (1, 8, 8), "residual")
    g.check()
    return g


def mlp(rng: np.random.Generator, act: dict, hidden: int = 16) -> Graph:
    nodes = [
        Node("x", "input"),
        Node("fc1", "gemm", ("x",), dict(weight=rng.normal(0, 0.3, (hidden, 64)), bias=rng.normal(0, 0.1, hidden))),
        Node("a1", "act", ("fc1",), act),
        Node("fc2", "gemm", ("a1",), dict(weight=rng.normal(0, 0.3, (10, hidden)), bias=rng.normal(0, 0.1, 10))),
    ]
    g = Graph(nodes, "fc2", (64,), "mlp")
    g.check()
    return g


def pooled_cnn(rng: np.random.Generator, c: int = 8) -> Graph:
    """conv -> ReLU -> conv -> ReLU -> global average pooling -> Gemm: the output stage (pooling,
    flatten, Gemm) has no lookup."""
    nodes = [
        Node("x", "input"),
        Node("c1", "conv", ("x",), conv_attrs(rng, 4, 1)),
        Node("r1", "act", ("c1",), dict(fn="relu")),
        Node("c2", "conv", ("r1",), conv_attrs(rng, c, 4)),
        Node("r2", "act", ("c2",), dict(fn="relu")),
        Node("gap", "avgpool", ("r2",), dict(kernel=(8, 8), strides=(8, 8))),
        Node("fl", "reshape", ("gap",), dict(shape=(c,))),
        Node("fc", "gemm", ("fl",), dict(weight=rng.normal(0, 0.5, (10, c)), bias=rng.normal(0, 0.1, 10))),
    ]
    g = Graph(nodes, "fc", (1, 8, 8), "pooled_cnn")
    g.check()
    return g


def tiled_cnn(rng: np.random.Generator, c: int = 4) -> Graph:
    """Every operator row tiles must handle, on a 12x12 input: padded, dilated and strided
    (asymmetrically padded, depthwise) convolutions, a residual join, max pooling with padding,
    a concatenation of two branches, an explicit Pad, average pooling; then Gemm."""
    nodes = [
        Node("x", "input"),
        Node("c1", "conv", ("x",), conv_attrs(rng, c, 1)),
        Node("r1", "act", ("c1",), dict(fn="relu")),
        Node("c2", "conv", ("r1",), dict(conv_attrs(rng, c, c, pads=(2, 2, 2, 2)), dilations=(2, 2))),
        Node("r2", "act", ("c2",), dict(fn="relu")),
        Node("add", "add", ("r2", "r1")),
        Node("r3", "act", ("add",), dict(fn="relu")),
        Node("dw", "conv", ("r3",), conv_attrs(rng, c, c, pads=(0, 0, 1, 1), strides=(2, 2), group=c)),
        Node("r4", "act", ("dw",), dict(fn="tanh")),
        Node("pw", "conv", ("r4",), conv_attrs(rng, 2, c, k=1, pads=(0, 0, 0, 0))),
        Node("r5", "act", ("pw",), dict(fn="relu")),
        Node("mp", "maxpool", ("r4",), dict(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1))),
        Node("cat", "concat", ("r5", "mp"), dict(axis=0)),
        Node("pad", "pad", ("cat",), dict(pads=(0, 1, 0, 0, 1, 0))),
        Node("c3", "conv", ("pad",), conv_attrs(rng, c, c + 2, pads=(0, 1, 0, 1))),
        Node("r6", "act", ("c3",), dict(fn="relu")),
        Node("ap", "avgpool", ("r6",), dict(kernel=(2, 2), strides=(2, 2))),
        Node("fl", "reshape", ("ap",), dict(shape=(c * 9,))),
        Node("fc", "gemm", ("fl",), dict(weight=rng.normal(0, 0.3, (10, c * 9)), bias=rng.normal(0, 0.1, 10))),
    ]
    g = Graph(nodes, "fc", (1, 12, 12), "tiled_cnn")
    g.check()
    return g
