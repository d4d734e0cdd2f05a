"""Checkpoints: architecture name and options, data set, metrics and weights, no pickled code.

Loading uses `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so a checkpoint from elsewhere cannot run code when opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gravel.errors import ModelError
from gravel.model.archs import build_model

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]

_FORMAT = "gravel-checkpoint"
_VERSION = 1


@dataclass
class Checkpoint:
    arch: str
    options: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    model: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    """Write atomically, so an interrupted save never leaves half a checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "arch": ckpt.arch,
        "options": ckpt.options,
        "input_shape": list(ckpt.input_shape),
        "num_classes": ckpt.num_classes,
        "dataset": ckpt.dataset,
        "metrics": ckpt.metrics,
        "state_dict": ckpt.model.state_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def is_checkpoint(path: str | Path) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not a checkpoint"
        return False
    return isinstance(payload, dict) and payload.get("format") == _FORMAT


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ModelError(f"{path}: not a readable Gravel checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ModelError(f"{path}: not a Gravel checkpoint (made by `gravel train`)")
    if payload.get("version") != _VERSION:
        raise ModelError(f"{path}: checkpoint version {payload.get('version')}, expected {_VERSION}")
    model, options = build_model(
        payload["arch"], tuple(payload["input_shape"]), payload["num_classes"], **payload["options"]
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit architecture {payload['arch']}: {exc}") from exc
    model.eval()
    return Checkpoint(
        arch=payload["arch"],
        options=options,
        input_shape=tuple(payload["input_shape"]),
        num_classes=payload["num_classes"],
        dataset=payload["dataset"],
        model=model,
        metrics=dict(payload.get("metrics", {})),
    )
