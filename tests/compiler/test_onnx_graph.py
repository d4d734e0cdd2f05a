"""ONNX import into the graph IR: the corpus through both torch exporters, single operators
against onnx's reference evaluator, and bad input."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from gravel.compiler.ir import evaluate
from gravel.compiler.onnx_import import (
    MAX_OPSET,
    MIN_OPSET,
    SUPPORTED_OPERATORS,
    graph_from_onnx,
    operator_table_markdown,
)
from gravel.errors import ModelError
from tests.compiler.corpus import CORPUS, Arch, digits_batch, export_onnx

EXPORTERS = ("torchscript", "dynamo")
README = Path(__file__).parents[2] / "README.md"
BY_NAME = {a.name: a for a in CORPUS}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Exports on demand, each (architecture, exporter) once per session."""
    root = tmp_path_factory.mktemp("onnx-corpus")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: Arch, exporter: str) -> Path:
        key = (arch.name, exporter)
        if key not in cache:
            cache[key] = export_onnx(arch, exporter == "dynamo", root / f"{arch.name}-{exporter}.onnx")
        return cache[key]

    return get


def torch_reference(arch: Arch, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    x = digits_batch(n, arch.flat)
    with torch.no_grad():
        return x, arch.model()(torch.from_numpy(x)).numpy()


def test_corpus_is_large_and_spans_opsets_13_to_21():
    assert len(CORPUS) >= 20
    assert {a.opset for a in CORPUS} == set(range(MIN_OPSET, MAX_OPSET + 1))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", CORPUS, ids=lambda a: a.name)
def test_corpus_imports_and_matches_torch(arch, exporter, exported):
    path = exported(arch, exporter)
    graph = graph_from_onnx(path)
    x, want = torch_reference(arch)
    assert graph.input_shape == arch.input_shape
    assert graph.name == path.stem
    np.testing.assert_allclose(evaluate(graph, x), want, atol=1e-4, rtol=1e-4)
    assert all(n.source for n in graph.nodes)
    if exporter == "torchscript":
        assert onnx.load(str(path)).opset_import[0].version == arch.opset


def test_dynamo_files_keep_weights_in_external_data(exported):
    path = exported(BY_NAME["resnet_block"], "dynamo")
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and (path.parent / (path.name + ".data")).is_file()
    graph = graph_from_onnx(path)
    assert any(n.op == "conv" and np.abs(n.attrs["weight"]).sum() > 0 for n in graph.nodes)


def _ops(graph):
    return [n.op for n in graph.nodes]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_corpus_structure(exporter, exported):
    """What the importer makes of particular operators, on both exporters' files."""
    g = {a.name: graph_from_onnx(exported(a, exporter)) for a in CORPUS}

    def fns(graph):
        return [n.attrs["fn"] for n in graph.nodes if n.op == "act"]

    assert "erf" in fns(g["mlp_gelu_erf"]) and "gelu" not in fns(g["mlp_gelu_erf"])
    assert {"gelu", "gelu_tanh"} <= set(fns(g["mlp_gelu20"]))
    # batch norm kept by the exporter (fold=False) becomes a per-channel affine (C, 1, 1)
    bn = [n for n in g["cnn_maxpool"].nodes if n.op == "affine"]
    assert bn and bn[0].attrs["scale"].shape == (4, 1, 1)
    assert [n.attrs.get("ceil_mode", 0) for n in g["cnn_maxpool"].nodes if n.op == "maxpool"] == [0, 1]
    assert "add" in _ops(g["resnet_block"]) and "concat" in _ops(g["concat_branches"])
    dw = [n for n in g["depthwise_separable"].nodes if n.op == "conv"]
    assert [n.attrs["group"] for n in dw] == [1, 4, 1, 2]
    pad = [n for n in g["pad_asymmetric"].nodes if n.op == "pad"]
    assert len(pad) == 1 and pad[0].attrs["pads"] == (0, 0, 1, 0, 1, 2) and pad[0].attrs["value"] == 0.25
    convs = [n.attrs["pads"] for n in g["pad_asymmetric"].nodes if n.op == "conv"]
    assert convs[1] == (1, 1, 2, 2)  # 'same' with a kernel of 4
    squares = [n for n in g["gating_square"].nodes if n.op == "mul" and n.inputs[0] == n.inputs[1]]
    assert len(squares) == 2  # b * b and y * y
    # MatMul + Add: the bias folds into the gemm; W @ x is a transposed gemm
    mm = g["matmul_both_sides"]
    gemms = [n for n in mm.nodes if n.op == "gemm"]
    assert np.abs(gemms[0].attrs["bias"]).sum() > 0 and mm.nodes[1].op == "gemm"
    assert _ops(mm)[2:5] == ["transpose", "gemm", "transpose"]
    flat = g["flat_normalised"]
    assert flat.input_shape == (64,) and _ops(flat)[1] == "affine"
    assert _ops(g["softmax_final"])[-1] == "softmax"
    assert not any(n.op == "act" and n.attrs["fn"] == "sign" and n.inputs[0] == "x" for n in g["rounding_sign"].nodes)


def test_readme_operator_table_is_current():
    text = README.read_text()
    begin = text.index("<!-- BEGIN operator table")
    body = text[text.index("\n", begin) + 1 : text.index("<!-- END operator table -->")]
    assert body == operator_table_markdown(), (
        "README's operator table is stale: replace it with "
        "gravel.compiler.onnx_import.operator_table_markdown()"
    )


def test_every_listed_operator_has_a_handler():
    from gravel.compiler.onnx_ops import HANDLERS

    folded_only = {"Constant", "ConstantOfShape"}
    assert set(SUPPORTED_OPERATORS) - folded_only <= set(HANDLERS)
    assert set(HANDLERS) <= set(SUPPORTED_OPERATORS)


# --------------------------------------------------------- single operators vs onnx's reference

F32 = np.float32
RNG = np.random.default_rng(7)


def _model(nodes, inits=None, shape=(3, 4, 4), opset=18, batch="N", outputs=("y",)):
    """A one-input ONNX model; outputs get their shapes from onnx's reference evaluator
    (the checker wants them), or none for models it cannot run."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *shape])
    init = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]

    def build(ys):
        graph = helper.make_graph(nodes, "g", [x], ys, init)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        return model

    model = build([helper.make_tensor_value_info(o, TensorProto.FLOAT, []) for o in outputs])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = ReferenceEvaluator(model).run(None, {"x": np.zeros((2, *shape), F32)})
    except Exception:  # noqa: BLE001 - models the reference cannot run keep rank-0 outputs
        return model
    return build([helper.make_tensor_value_info(o, TensorProto.FLOAT, [batch, *v.shape[1:]])
                  for o, v in zip(outputs, got)])


def _w(*shape):
    return (RNG.standard_normal(shape) * 0.5).astype(F32)


def _i64(*v):
    return np.array(v, dtype=np.int64)


N = helper.make_node
CASES = {
    "gemm_alpha_beta_row_bias": (
        [N("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0)], {"w": _w(6, 5), "c": _w(1, 5)}, (6,), 13),
    "gemm_transB_scalar_bias": (
        [N("Gemm", ["x", "w", "c"], ["y"], transB=1)], {"w": _w(5, 6), "c": np.array(0.3, F32)}, (6,), 18),
    "gemm_no_bias": ([N("Gemm", ["x", "w"], ["y"], transB=1)], {"w": _w(5, 6)}, (6,), 21),
    "conv_same_upper_stride2": (
        [N("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        {"w": _w(4, 2, 3, 3), "b": _w(4)}, (2, 5, 6), 18),
    "conv_same_lower_even_kernel": (
        [N("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER")], {"w": _w(2, 2, 2, 2)}, (2, 5, 5), 13),
    "conv_valid_dilated_grouped": (
        [N("Conv", ["x", "w"], ["y"], auto_pad="VALID", dilations=[2, 1], group=2)], {"w": _w(4, 1, 2, 3)}, (2, 6, 6), 17),
    "conv_asymmetric_pads": (
        [N("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 0])], {"w": _w(3, 3, 3, 3)}, (3, 4, 4), 15),
    "maxpool_same_lower": ([N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], auto_pad="SAME_LOWER")], {}, (2, 5, 5), 18),
    "maxpool_dilated_ceil": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2], ceil_mode=1)],
        {}, (2, 7, 7), 18),
    "avgpool_include_pad_ceil": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
           count_include_pad=1)], {}, (2, 6, 6), 19),
    "avgpool_exclude_pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], pads=[1, 0, 1, 1])], {}, (2, 5, 5), 13),
    "global_max_pool": ([N("GlobalMaxPool", ["x"], ["y"])], {}, (3, 4, 5), 18),
    "reduce_mean_no_keepdims": ([N("ReduceMean", ["x", "ax"], ["y"], keepdims=0)], {"ax": _i64(-1, -2)}, (3, 4, 4), 18),
    "reduce_mean_attribute_axes": ([N("ReduceMean", ["x"], ["y"], axes=[2, 3])], {}, (3, 4, 4), 17),
    "reduce_sum": ([N("ReduceSum", ["x", "ax"], ["y"])], {"ax": _i64(2, 3)}, (3, 4, 4), 13),
    "reduce_max": ([N("ReduceMax", ["x", "ax"], ["y"], keepdims=0)], {"ax": _i64(2, 3)}, (3, 4, 4), 18),
    "batchnorm_sequence": (
        [N("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3)],
        {"g": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.5}, (3, 5), 15),
    "prelu_per_channel": ([N("PRelu", ["x", "s"], ["y"])], {"s": _w(3, 1, 1)}, (3, 4, 4), 16),
    "prelu_shared": ([N("PRelu", ["x", "s"], ["y"])], {"s": np.array([0.2], F32)}, (3, 4, 4), 13),
    "clip_min_only": ([N("Clip", ["x", "lo", ""], ["y"])], {"lo": np.array(-0.2, F32)}, (6,), 13),
    "relu6_as_clip": ([N("Clip", ["x", "lo", "hi"], ["y"])], {"lo": np.array(0, F32), "hi": np.array(6, F32)}, (6,), 18),
    "clip_attributes_opset10": ([N("Clip", ["x"], ["y"], min=-0.3, max=0.4)], {}, (6,), 10),
    "hard_sigmoid_params": ([N("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)], {}, (6,), 13),
    "selu_elu_celu_leaky": (
        [N("Selu", ["x"], ["a"]), N("Elu", ["a"], ["b"], alpha=0.7), N("Celu", ["b"], ["c"], alpha=1.5),
         N("LeakyRelu", ["c"], ["y"], alpha=0.2)], {}, (6,), 18),
    "softplus_softsign_mish": ([N("Softplus", ["x"], ["a"]), N("Softsign", ["a"], ["b"]), N("Mish", ["b"], ["y"])], {}, (6,), 18),
    "pow_cube_and_square": (
        [N("Pow", ["x", "e3"], ["a"]), N("Pow", ["a", "e2"], ["y"])],
        {"e3": np.array(3.0, F32), "e2": np.array([2.0], F32)}, (6,), 15),
    "sum_max_min_constants": (
        [N("Sum", ["x", "x", "c"], ["a"]), N("Max", ["a", "lo"], ["b"]), N("Min", ["b", "hi"], ["y"])],
        {"c": np.array(0.1, F32), "lo": np.array(-0.5, F32), "hi": np.array(0.8, F32)}, (6,), 13),
    "constant_divided_by_x": ([N("Abs", ["x"], ["a"]), N("Div", ["c", "a"], ["y"])], {"c": np.array(2.0, F32)}, (6,), 13),
    "sub_from_constant_per_channel": ([N("Sub", ["c", "x"], ["y"])], {"c": _w(3, 1, 1)}, (3, 4, 4), 14),
    "mul_batch_one_constant": ([N("Mul", ["x", "c"], ["y"])], {"c": _w(1, 3, 1, 4)}, (3, 4, 4), 14),
    "transpose_reshape_zero_minus_one": (
        [N("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]), N("Reshape", ["a", "s"], ["y"])],
        {"s": _i64(0, 4, -1)}, (3, 4, 4), 18),
    "squeeze_unsqueeze_inputs": (
        [N("Unsqueeze", ["x", "u"], ["a"]), N("Squeeze", ["a", "u"], ["y"])], {"u": _i64(-1, 2)}, (3, 4), 13),
    "squeeze_unsqueeze_attributes_opset11": (
        [N("Unsqueeze", ["x"], ["a"], axes=[1]), N("Squeeze", ["a"], ["y"], axes=[1])], {}, (3, 4), 11),
    "flatten_then_matmul_vector": (
        [N("Flatten", ["x"], ["a"]), N("MatMul", ["a", "v"], ["y"])], {"v": _w(12)}, (3, 4), 13),
    "matmul_left_constant_vector": ([N("MatMul", ["v", "x"], ["y"])], {"v": _w(3)}, (2, 3, 4), 13),
    "matmul_add_bias_row": (
        [N("MatMul", ["x", "w"], ["a"]), N("Add", ["b", "a"], ["y"])], {"w": _w(4, 5), "b": _w(1, 1, 5)}, (3, 4), 18),
    "pad_axes_input": (
        [N("Pad", ["x", "p", "v", "ax"], ["y"])], {"p": _i64(1, 2), "v": np.array(0.5, F32), "ax": _i64(-1)},
        (2, 3, 3), 18),
    "concat_negative_axis": ([N("Relu", ["x"], ["a"]), N("Concat", ["x", "a"], ["y"], axis=-1)], {}, (2, 3), 13),
    "softmax_axis1": ([N("Softmax", ["x"], ["y"], axis=1)], {}, (3, 4), 13),
    "cast_identity_dropout": (
        [N("Cast", ["x"], ["a"], to=TensorProto.FLOAT), N("Identity", ["a"], ["b"]),
         N("Dropout", ["b", "r", "t"], ["y"])], {"r": np.array(0.5, F32), "t": np.array(False)}, (6,), 13),
    "shape_arithmetic_reshape": (
        [N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["n"], axis=0), N("Unsqueeze", ["n", "zero1"], ["n1"]),
         N("Shape", ["x"], ["tail"], start=1), N("ReduceProd", ["tail"], ["p"], keepdims=1),
         N("Concat", ["n1", "p"], ["t"], axis=0), N("Reshape", ["x", "t"], ["y"])],
        {"zero": np.array(0, np.int64), "zero1": _i64(0)}, (3, 4), 18),
    "constant_of_shape_like_x": (
        [N("Shape", ["x"], ["s"]), N("ConstantOfShape", ["s"], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
         N("Add", ["x", "c"], ["y"])], {}, (3, 4), 18),
    "expand_no_op_and_size": (
        [N("Expand", ["x", "one"], ["y"])], {"one": _i64(1, 1, 1)}, (3, 4), 13),
    "sign_exact_at_zero": ([N("Relu", ["x"], ["a"]), N("Sign", ["a"], ["y"])], {}, (6,), 13),
    "rounding": ([N("Floor", ["x"], ["a"]), N("Ceil", ["x"], ["b"]), N("Add", ["a", "b"], ["c"]),
                  N("Round", ["c"], ["d"]), N("Neg", ["d"], ["y"])], {}, (6,), 13),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_operators_match_onnx_reference(case):
    nodes, inits, shape, opset = CASES[case]
    model = _model(nodes, inits, shape, opset)
    x = RNG.standard_normal((3, *shape)).astype(F32)
    if case == "sign_exact_at_zero":
        x[0, :3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    graph = graph_from_onnx(model)
    got = evaluate(graph, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if opset < MIN_OPSET:
        assert graph.notes and "converted" in graph.notes[0]


def test_log_softmax_becomes_a_softmax_with_a_note():
    graph = graph_from_onnx(_model([N("LogSoftmax", ["x"], ["y"], axis=-1)], shape=(5,)))
    node = graph.nodes[-1]
    assert node.op == "softmax" and node.attrs == {"axis": 0, "log": True}
    assert any("LogSoftmax" in note for note in graph.notes)


def test_bytes_and_model_proto_inputs(exported):
    path = exported(BY_NAME["cnn_avgpool"], "torchscript")
    data = path.read_bytes()
    x, want = torch_reference(BY_NAME["cnn_avgpool"], 8)
    for src in (data, onnx.load_model_from_string(data)):
        np.testing.assert_allclose(evaluate(graph_from_onnx(src, name="m"), x), want, atol=1e-4)


def test_opset_above_21_is_converted_down():
    model = _model([N("Relu", ["x"], ["y"])], shape=(4,), opset=22)
    graph = graph_from_onnx(model)
    assert graph.notes[0] == "converted from ONNX opset 22 to 21"


# --------------------------------------------------------------------------- bad input


def test_truncated_or_garbage_file_names_the_file(tmp_path, exported):
    data = exported(BY_NAME["mlp_relu"], "torchscript").read_bytes()
    for n, content in enumerate((data[: len(data) // 2], data[:10], b"not an onnx model at all")):
        bad = tmp_path / f"bad{n}.onnx"
        bad.write_bytes(content)
        with pytest.raises(ModelError, match=rf"{bad}: not (a readable|a valid|an) ONNX model"):
            graph_from_onnx(bad)
    with pytest.raises(ModelError, match="no such ONNX file"):
        graph_from_onnx(tmp_path / "missing.onnx")


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


def test_two_inputs_refused(tmp_path):
    path = tmp_path / "two.onnx"
    torch.onnx.export(TwoInputs(), (torch.zeros(1, 4), torch.zeros(1, 4)), str(path), dynamo=False,
                      input_names=["a", "b"])
    with pytest.raises(ModelError, match=r"2 inputs \('a', 'b'\).*exactly one input"):
        graph_from_onnx(path)


def test_dynamic_per_sample_dim_refused_with_what_to_do(tmp_path):
    path = tmp_path / "dyn.onnx"
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["image"],
                      dynamic_axes={"image": {0: "batch", 2: "height"}})
    with pytest.raises(ModelError, match=r"input 'image' has a dynamic dimension 2 \(height\).*fixed input shape"):
        graph_from_onnx(path)


def test_fixed_batch_above_one_refused():
    with pytest.raises(ModelError, match="fixed batch of 4"):
        graph_from_onnx(_model([N("Relu", ["x"], ["y"])], shape=(4,), batch=4))


def test_two_outputs_refused():
    with pytest.raises(ModelError, match="2 outputs"):
        graph_from_onnx(_model([N("Relu", ["x"], ["y"]), N("Neg", ["x"], ["z"])], shape=(4,), outputs=("y", "z")))


class ManyUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        a = self.norm(x)  # (N, 1, 8, 8)
        b = self.up(x)[:, :, :8, :8]
        c = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1]
        return a + b + c + x / (x.sum(dim=3, keepdim=True) + 1)


def test_every_unsupported_node_is_listed_at_once(tmp_path):
    path = tmp_path / "many.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ManyUnsupported(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=18)
    with pytest.raises(ModelError) as info:
        graph_from_onnx(path)
    msg = str(info.value)
    for expected in ("LayerNormalization '/norm/LayerNormalization'", "Resize '/up/Resize'", "Slice '/Slice'",
                     "Pad '/Pad'", "mode 'reflect'", "ReduceSum '/ReduceSum'"):
        assert expected in msg
    # the Div reads the ReduceSum's output: it is not checked, nor reported
    assert msg.count("\n  - ") == 8 and "Div" not in msg and "what is imported" in msg


def test_unsupported_reasons_name_the_node_and_what_to_do():
    cases = {
        "across the batch axis": ([N("Reshape", ["x", "s"], ["y"])], {"s": _i64(-1, 4)}),
        "moves the batch axis": ([N("Transpose", ["x"], ["y"], perm=[1, 0, 2])], {}),
        "varies over the batch axis": ([N("Add", ["x", "c"], ["y"])], {"c": _w(2, 3, 4)}),
        "division of two computed tensors": ([N("Relu", ["x"], ["a"]), N("Neg", ["x"], ["b"]), N("Div", ["a", "b"], ["y"])], {}),
        "2-D convolution": ([N("Conv", ["x", "w"], ["y"])], {"w": _w(2, 3, 2)}),
        "Flatten with axis=2": ([N("Flatten", ["x"], ["y"], axis=2)], {}),
        "not standard ONNX": ([N("Gelu", ["x"], ["y"], domain="com.microsoft")], {}),
        "constant \\(weight\\) operand": ([N("Relu", ["x"], ["a"]), N("MatMul", ["x", "a"], ["y"])], {}),
    }
    for reason, (nodes, inits) in cases.items():
        model = _model(nodes, inits, shape=(3, 4), opset=18)
        if reason == "not standard ONNX":
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        with pytest.raises(ModelError, match=reason) as info:
            graph_from_onnx(model)
        assert f"{nodes[-1].op_type} '" in str(info.value)


def _dynamo_copy(exported, tmp_path) -> Path:
    src = exported(BY_NAME["mlp_relu"], "dynamo")
    d = tmp_path / "model"
    d.mkdir()
    (d / "m.onnx").write_bytes(src.read_bytes())
    (d / "w.data").write_bytes((src.parent / (src.name + ".data")).read_bytes())
    _relocate(d / "m.onnx", "w.data")
    return d / "m.onnx"


def _relocate(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(model.SerializeToString())


def test_external_data_outside_the_model_directory_refused(exported, tmp_path):
    path = _dynamo_copy(exported, tmp_path)
    assert graph_from_onnx(path).input_shape == (1, 8, 8)
    (tmp_path / "outside.data").write_bytes((path.parent / "w.data").read_bytes())
    for location in ("../outside.data", str(tmp_path / "outside.data"), "sub/../../outside.data"):
        _relocate(path, location)
        with pytest.raises(ModelError, match=r"external data at .*(outside the model's directory|not a path relative)"):
            graph_from_onnx(path)
    os.symlink(tmp_path / "outside.data", path.parent / "link.data")
    _relocate(path, "link.data")
    with pytest.raises(ModelError, match="outside the model's directory"):
        graph_from_onnx(path)


def test_external_data_missing_or_truncated(exported, tmp_path):
    path = _dynamo_copy(exported, tmp_path)
    data = path.parent / "w.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match=r"w.data is truncated"):
        graph_from_onnx(path)
    data.unlink()
    with pytest.raises(ModelError, match=r"w.data, which is missing"):
        graph_from_onnx(path)
    with pytest.raises(ModelError, match="pass the model's path"):
        graph_from_onnx(exported(BY_NAME["mlp_relu"], "dynamo").read_bytes())
