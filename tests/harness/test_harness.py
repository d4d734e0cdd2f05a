"""check and bench on the digits model, with real encryption for a couple of images."""

import torch

from gravel.compiler import compile_model
from gravel.harness import bench, check
from gravel.harness.common import calib_images
from gravel.model import build_model, train
from gravel.protocol import load_manifest

BENCH_KEYS = {
    "accuracy_clear", "accuracy_encrypted", "agreement", "latency_s", "keygen_s", "encrypt_s", "decrypt_s",
    "eval_key_bytes", "input_ct_bytes", "output_ct_bytes", "pbs_count", "workers",
}


def test_bench_reports_every_figure(digits_artifact, digits):
    r = bench(digits_artifact, digits, samples=2, progress=False)
    assert BENCH_KEYS <= set(r)
    assert r["samples"] == 2 and r["workers"] == 1 and r["pbs_count"] == 16
    assert r["eval_key_bytes"] > 1e6 and 0 < r["input_ct_bytes"] < 100_000
    assert 0 <= r["agreement"] <= 1 and r["latency_s"] > 0


def test_check_reports_stages_estimates_and_warns(digits_checkpoint, digits):
    # fixed default widths (the post-training search may pick finer ones for some trained models)
    r = check(digits_checkpoint, digits, samples=200, sim_samples=20, fhe_samples=1, calib=200, progress=False,
              config=__import__("gravel").QuantConfig(search=False))
    assert r["supported"] and [row["stage"] for row in r["stages"]] == ["stage0", "stage1"]
    assert r["stages"][0]["table_lookups"] == 16 and r["table_lookups"] == 16
    assert all(int(bits) <= 5 for bits in r["lookup_bits"])  # lookups on at most tlu_bits bits
    assert r["latency_estimate_s"] > 0 and r["eval_key_bytes_estimate"] > 1e6
    assert r["accuracy_float"] > 0.7 and r["encrypted_samples"] == 1
    # 2-bit lookups lose accuracy: check names the layer and the lookup width that keeps it
    r2 = check(digits_checkpoint, digits, samples=200, sim_samples=0, fhe_samples=0, calib=200, progress=False,
               config=__import__("gravel").QuantConfig(tlu_bits=2, search=False), estimate=False)
    assert any("loses the most accuracy" in w and "-bit lookups keep the model within" in w
               for w in r2["warnings"]), r2["warnings"]
    assert any("--finetune 3" in w for w in r2["warnings"])
    assert r2["accuracy_simulated"] is None
    # and fine-tuning at those widths, measured by check itself, recovers part of the loss
    r3 = check(digits_checkpoint, digits, samples=200, sim_samples=0, fhe_samples=0, calib=200, progress=False,
               config=__import__("gravel").QuantConfig(tlu_bits=2, search=False), estimate=False, finetune=6)
    assert r3["accuracy_quantized"] > r2["accuracy_quantized"], (r2["accuracy_quantized"], r3["accuracy_quantized"])
    assert any(w.startswith("fine-tuned the quantized program") for w in r3["warnings"]), r3["warnings"]
    assert not any("--finetune 3" in w for w in r3["warnings"])


def test_check_lists_every_unsupported_node_at_once(tmp_path, digits):
    from torch import nn

    class Odd(nn.Module):
        def forward(self, x):
            return torch.cumsum(x.flatten(1), 1)[:, :10] + torch.sort(x.flatten(1), 1).values[:, :10]

    path = tmp_path / "odd.onnx"
    torch.onnx.export(Odd(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)
    r = check(path, digits, samples=10, sim_samples=0, fhe_samples=0, calib=20, progress=False)
    assert r["supported"] is False
    text = "\n".join(r["problems"])
    assert "CumSum" in text and ("TopK" in text or "Sort" in text or "Slice" in text)


def test_onnx_float_model_compiles_post_training(tmp_path, digits):
    model, _ = build_model("float-mlp", digits.image_shape, 10, hidden=[16])
    train(model, digits, epochs=10, lr=1e-2, progress=False)
    path = tmp_path / "float.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)
    manifest = compile_model(path, calib_images(digits, 200), tmp_path / "onnx.gravel", max_shards=4)
    assert load_manifest(tmp_path / "onnx.gravel").name == "float"
    assert manifest.data["model"]["source"] == "onnx"
    r = bench(tmp_path / "onnx.gravel", digits, samples=2, progress=False)
    assert r["accuracy_clear"] >= 0.5


def test_check_per_layer_analysis_on_conv_first_float_model(tmp_path, digits):
    """A model that starts with a convolution (no input quantizer, no flatten first)."""
    from gravel.model import Checkpoint, save_checkpoint

    model, opts = build_model("float-cnn", digits.image_shape, 10)
    metrics = train(model, digits, epochs=8, lr=1e-2, progress=False)
    path = tmp_path / "cnn.pt"
    save_checkpoint(Checkpoint("float-cnn", opts, digits.image_shape, 10, "digits", model, metrics), path)
    r = check(path, digits, samples=200, sim_samples=5, fhe_samples=0, calib=200, progress=False, estimate=False)
    first = r["stages"][0]
    assert first["table_lookups"] == 2 * 8 * 8  # 2 channels x 8x8 positions
    # the post-training search keeps the quantized model close to the float model
    assert r["accuracy_quantized"] > r["accuracy_float"] - 0.05
    assert any("post-training quantization chose" in w for w in r["warnings"])
