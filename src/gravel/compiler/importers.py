"""One entry point from whatever a user has to an IR `Graph`: a Gravel checkpoint, an ONNX
file or a `torch.nn.Module`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gravel.compiler.ir import Graph
from gravel.errors import ModelError

__all__ = ["load_graph_model"]


def load_graph_model(model: Any, sample_shape_or_input: Any = None) -> tuple[Graph, dict[str, Any]]:
    """The graph of `model` and a description of it (name, source, and for checkpoints the
    architecture, options and data set).

    `sample_shape_or_input` fixes an nn.Module's input: a per-sample shape such as (1, 28, 28)
    (no batch axis) or a sample batch (tensor or array, batch axis first). A checkpoint
    records its own input shape and an ONNX file declares it; given for those, it must agree.
    """
    from torch import nn

    from gravel.compiler.onnx_import import graph_from_onnx
    from gravel.compiler.torch_import import graph_from_torch

    if isinstance(model, nn.Module):
        if sample_shape_or_input is None:
            raise ModelError(
                "an nn.Module needs its input shape: pass a per-sample shape such as (1, 28, 28) "
                "or a sample batch"
            )
        name = type(model).__name__
        return graph_from_torch(model, _sample(sample_shape_or_input), name), {"name": name, "source": "torch"}
    if not isinstance(model, (str, Path)):
        raise ModelError(f"expected a checkpoint or ONNX path, or an nn.Module, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    if path.suffix.lower() == ".onnx":
        graph = graph_from_onnx(path)
        _agree(graph.input_shape, sample_shape_or_input, str(path))
        return graph, {"name": path.stem, "source": "onnx"}
    from gravel.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    shape = tuple(ckpt.input_shape)
    _agree(shape, sample_shape_or_input, str(path))
    info = {"name": path.stem, "source": "checkpoint", "arch": ckpt.arch, "options": ckpt.options,
            "dataset": ckpt.dataset}
    return graph_from_torch(ckpt.model, _sample(shape), path.stem), info


def _sample(shape_or_input: Any) -> Any:
    """A sample batch: the given batch, or one sample of a per-sample shape."""
    import torch

    if isinstance(shape_or_input, (torch.Tensor, np.ndarray)):
        return shape_or_input
    shape = _shape(shape_or_input)
    g = torch.Generator().manual_seed(0)
    return torch.rand((1, *shape), generator=g)


def _shape(v: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in v)
    except (TypeError, ValueError):
        raise ModelError(f"expected a per-sample shape such as (1, 28, 28) or a sample batch, got {v!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ModelError(f"per-sample shape {shape} must have positive dimensions")
    return shape


def _agree(declared: tuple[int, ...], given: Any, where: str) -> None:
    if given is None:
        return
    import torch

    shape = tuple(given.shape[1:]) if isinstance(given, (torch.Tensor, np.ndarray)) else _shape(given)
    if tuple(shape) != tuple(declared):
        same = math.prod(shape) == math.prod(declared)
        raise ModelError(
            f"{where}: the model declares input shape {tuple(declared)} per sample, but "
            f"{tuple(shape)} was given" + ("; reshape the data to the declared shape" if same else "")
        )
