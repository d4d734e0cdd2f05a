"""Fine-tuning a CKKS program with its polynomial activations in place.

A ReLU (GELU, SiLU, ...) replaced by a low-degree polynomial fitted on the calibrated range
costs accuracy; training the network a little with the polynomial in its place recovers most
of it. This trains the program itself, not the user's model: every stage's dense matrix and bias
(each the product of the gemm, conv, pooling and affine nodes between two activations, see
gravel.ckks.program) in float64 torch, the polynomials fixed, on labelled samples. So it works
for any imported model (an ONNX file as well as an nn.Module) and what is trained is exactly
what the server evaluates. The program's parameters are planned afterwards, from the new
output range.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gravel.ckks.program import CkksProgram
from gravel.compiler.finetune import check_finetune_data, minibatches

__all__ = ["finetune_program"]


def _forward(torch: Any, program: CkksProgram, params: list[Any], x: Any) -> Any:
    h, k = x, 0
    for st in program.stages:
        if st.weight is not None:
            h = h @ params[k].T + params[k + 1]
            k += 2
        if st.poly is not None:
            h = sum(c * h ** i for i, c in enumerate(st.poly) if c != 0.0)
    return h * program.out_scale + program.out_offset


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def finetune_program(program: CkksProgram, x: np.ndarray, y: np.ndarray, epochs: int = 5,
                     lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """Train `program`'s matrices and biases in place (cross-entropy on labels `y`), keeping
    the weights of the best epoch by accuracy on `x`; returns the accuracies before and after."""
    import torch

    x = program.conform(x)
    y = check_finetune_data(x, y, epochs)
    torch.manual_seed(seed)
    params = [torch.tensor(a, dtype=torch.float64, requires_grad=True)
              for st in program.stages if st.weight is not None for a in (st.weight, st.bias)]
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = torch.optim.Adam(params, lr=lr)
    before = _accuracy(program.simulate(x), y)
    best, best_acc = [p.detach().clone() for p in params], before
    iterator: Any = range(epochs)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="fine-tuning with the polynomials", unit="epoch")
    for _ in iterator:
        for idx in minibatches(torch, len(xt), batch_size):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(_forward(torch, program, params, xt[idx]), yt[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # a polynomial's gradient can be steep
            opt.step()
        with torch.no_grad():
            acc = _accuracy(_forward(torch, program, params, xt).numpy(), y)
        if acc > best_acc:
            best, best_acc = [p.detach().clone() for p in params], acc
    k = 0
    for st in program.stages:
        if st.weight is not None:
            st.weight, st.bias = best[k].numpy().copy(), best[k + 1].numpy().copy()
            k += 2
    return {"samples": len(x), "epochs": epochs, "accuracy_before": before,
            "accuracy_after": _accuracy(program.simulate(x), y)}
