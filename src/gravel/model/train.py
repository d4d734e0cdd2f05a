"""Training loop shared by every architecture (QAT needs nothing special beyond the STE layers)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gravel.data import Dataset

__all__ = ["evaluate", "train"]


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of `model` on float images `x` with labels `y`."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
        correct += int((logits.argmax(1).numpy() == y[i : i + batch]).sum())
    return correct / max(1, len(x))


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Adam with cosine decay; returns train and test accuracy. Binary weights stay in [-1, 1]."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    binary = [m for m in model.modules() if getattr(m, "w_bits", None) == 1]
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress, leave=False)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            for m in binary:
                m.weight.data.clamp_(-1, 1)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return {
        "train_accuracy": evaluate(model, data.x_train, data.y_train),
        "test_accuracy": evaluate(model, data.x_test, data.y_test),
    }
