"""PyTorch models for quantization-aware training, and their checkpoints."""

from gravel.model.archs import ARCHS, build_model
from gravel.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gravel.model.quant import (
    BinaryConv2d,
    BinaryLinear,
    InputQuant,
    QuantConv2d,
    QuantLinear,
    QuantReLU,
    SignActivation,
)
from gravel.model.train import evaluate, train

__all__ = [
    "ARCHS",
    "BinaryConv2d",
    "BinaryLinear",
    "Checkpoint",
    "InputQuant",
    "QuantConv2d",
    "QuantLinear",
    "QuantReLU",
    "SignActivation",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
