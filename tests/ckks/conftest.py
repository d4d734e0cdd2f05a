"""CKKS model backend fixtures: a digits MLP 64-16-10 with x^2 activations, trained in plain
PyTorch, compiled once per session into a real artifact, and one client's keys for it."""

from __future__ import annotations

import numpy as np
import pytest


def train_digits_mlp(digits, act: str, hidden: int = 16, seed: int = 0):
    import torch
    from torch import nn

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    torch.manual_seed(seed)
    layer = Square() if act == "square" else nn.ReLU()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), layer, nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.tensor(digits.x_train), torch.tensor(digits.y_train)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def sq_model(digits):
    return train_digits_mlp(digits, "square")


@pytest.fixture(scope="session")
def relu_model(digits):
    return train_digits_mlp(digits, "relu", seed=1)


@pytest.fixture(scope="session")
def sq_artifact(tmp_path_factory, digits, sq_model):
    from gravel.ckks.artifact import compile_ckks_model

    out = tmp_path_factory.mktemp("ckks") / "sq.gravel"
    return compile_ckks_model(sq_model, digits.x_train[:300], out, digits.y_train[:300], name="sq")


@pytest.fixture(scope="session")
def sq_keys(sq_artifact):
    """A client with keys for both packings, and the bytes its server receives."""
    from gravel.ckks.artifact import load_client

    client = load_client(sq_artifact.root)
    client.keygen(("single", "batch"))
    return client, client.evaluation_keys()


@pytest.fixture(scope="session")
def sq_float_logits(digits, sq_model):
    import torch

    with torch.no_grad():
        return sq_model(torch.tensor(digits.x_test[:64])).numpy().astype(np.float64)
