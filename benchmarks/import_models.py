"""Issue 8's figures: models trained in plain PyTorch, exported to ONNX, compiled at defaults.

    python benchmarks/import_models.py mlp     [--samples 30] [--exporter dynamo|legacy]
    python benchmarks/import_models.py resnet  [--samples 3]
    python benchmarks/import_models.py resnet  --a-bits 6 --tlu-bits 6 --finetune 3 --finetune-samples 30000

`mlp`: the reference 784-128-64-10 MLP with the input normalisation inside the graph
((x - 0.1307) / 0.3081, exported as Sub and Div), trained on the 5k MNIST training subset,
exported by torch's default (dynamo) exporter, compiled by `gravel compile` at default
settings, then run encrypted on the first test images. `resnet`: a small ResNet-style CNN
(stem, one residual block, a strided block, global average pooling, batch norm throughout)
trained on Fashion-MNIST. Each prints one JSON line: float and quantized accuracy (on 2000
test images), encrypted accuracy and agreement, median latency, key and ciphertext sizes,
lookups. Trained models are cached under runs/ so a second run only measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

RUNS = Path(__file__).resolve().parent.parent / "runs"


class ReferenceMLP(nn.Module):
    """784-128-64-10 with ReLU; the normalisation is part of the model, as people write it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.flatten(1) - 0.1307) / 0.3081
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + x)


class SmallResNet(nn.Module):
    """stem (stride 2) -> residual block at 14x14 -> strided conv -> `deep` residual blocks at
    7x7 -> global average pool -> linear."""

    def __init__(self, c: int = 8, deep: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.block = Block(c)
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c),
                                  nn.ReLU())
        self.deep = nn.Sequential(*[Block(2 * c) for _ in range(deep)])
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.deep(self.down(self.block(self.stem(x))))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (zero fill), per image."""
    n = len(x)
    flip = torch.rand(n) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, n))
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 4)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, aug: bool = False) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4) if aug else torch.optim.Adam(
        model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 127) // 128))
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            xb = augment(xt[idx]) if aug else xt[idx]
            nn.functional.cross_entropy(model(xb), yt[idx]).backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs}", file=sys.stderr)
    return model.eval()


def export(model: nn.Module, sample: torch.Tensor, path: Path, exporter: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample,), str(path), dynamo=exporter == "dynamo", external_data=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["mlp", "resnet"])
    ap.add_argument("--samples", type=int, default=None, help="encrypted test images (default 30 mlp, 3 resnet)")
    ap.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    ap.add_argument("--epochs", type=int, help="training epochs when no cached model (default 30 mlp, 30 resnet)")
    ap.add_argument("--width", type=int, default=8, help="resnet: channels of the first stage (default 8)")
    ap.add_argument("--deep", type=int, default=1, help="resnet: residual blocks at the 7x7 stage (default 1)")
    ap.add_argument("--shards", type=int, default=1, help="most shards per stage (1: one process, fused)")
    ap.add_argument("--in-bits", type=int)
    ap.add_argument("--w-bits", type=int)
    ap.add_argument("--a-bits", type=int)
    ap.add_argument("--tlu-bits", type=int)
    ap.add_argument("--p-error", type=float, default=None)
    ap.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                    help="fine-tune the quantized program that many epochs (gravel compile --finetune)")
    ap.add_argument("--finetune-samples", type=int, default=10_000,
                    help="training samples for --finetune (default 10,000, as gravel compile uses)")
    args = ap.parse_args()

    from gravel.compiler import Finetune, QuantConfig, compile_model
    from gravel.data import load_dataset
    from gravel.harness.bench import bench
    from gravel.harness.common import calib_images, calib_labels

    data = load_dataset("mnist" if args.model == "mlp" else "fashion-mnist")
    RUNS.mkdir(exist_ok=True)
    tag = args.model if args.model == "mlp" else f"resnet{args.width}d{args.deep}"
    onnx_path = RUNS / f"{tag}-{args.exporter}.onnx"
    weights = RUNS / f"{tag}.pt"
    model = ReferenceMLP() if args.model == "mlp" else SmallResNet(args.width, args.deep)
    t = time.perf_counter()
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
    else:
        if args.model == "mlp":
            train(model, data.x_train, data.y_train, epochs=args.epochs or 30, lr=2e-3)
        else:
            train(model, data.x_train, data.y_train, epochs=args.epochs or 30, lr=3e-3, aug=True)
        torch.save(model.state_dict(), weights)
    train_s = time.perf_counter() - t
    if not onnx_path.exists():
        export(model, torch.from_numpy(data.x_test[:1]).float(), onnx_path, args.exporter)
    with torch.no_grad():
        float_pred = model(torch.from_numpy(data.x_test).float()).argmax(1).numpy()
    acc_float = float((float_pred[:2000] == data.y_test[:2000]).mean())
    acc_float_all = float((float_pred == data.y_test).mean())
    given = {k: getattr(args, k) for k in ("in_bits", "w_bits", "a_bits", "tlu_bits") if getattr(args, k)}
    config = QuantConfig(**given, search=not given)  # defaults: the compiler's own search
    kwargs = {"max_shards": args.shards}
    if args.p_error is not None:
        kwargs["p_error"] = args.p_error
    if args.finetune:
        n = args.finetune_samples
        kwargs["finetune"] = Finetune(data.x_train[:n], data.y_train[:n], args.finetune, progress=True)
    art = RUNS / f"{tag}-{args.exporter}.gravel"
    t = time.perf_counter()
    manifest = compile_model(onnx_path, calib_images(data, 500), art, config, overwrite=True,
                             calib_y=calib_labels(data, 500), **kwargs)
    compile_s = time.perf_counter() - t
    from gravel.compiler import load_graph

    quant_pred = load_graph(manifest).predict(data.x_test)
    acc_quant = float((quant_pred[:2000] == data.y_test[:2000]).mean())
    acc_quant_all = float((quant_pred == data.y_test).mean())
    samples = args.samples or (30 if args.model == "mlp" else 3)
    r = bench(art, data, samples=samples, progress=False)
    r.update({
        "benchmark": f"import-{args.model}", "exporter": args.exporter, "onnx": onnx_path.name,
        "accuracy_float_2000": acc_float, "accuracy_quantized_2000": acc_quant,
        "loss_points": round(100 * (acc_float - acc_quant), 2),
        f"accuracy_float_{len(data.y_test)}": acc_float_all, f"accuracy_quantized_{len(data.y_test)}": acc_quant_all,
        "table_lookups": manifest.data["stats"]["table_lookups"],
        "finetune": manifest.data["model"].get("finetune"),
        "config": {"in_bits": config.in_bits, "w_bits": config.w_bits, "a_bits": config.a_bits,
                   "tlu_bits": config.tlu_bits, "p_error": manifest.data["backend"]["p_error"]},
        "compile_s": round(compile_s, 1), "train_s": round(train_s, 1), "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    })
    print(json.dumps(r))


if __name__ == "__main__":
    main()
