"""The CLI's shape: one module per command group, each registering its own commands beside
their handlers; and the tables check and bench print, from their typed results."""

from __future__ import annotations

import argparse

import pytest

from gravel.cli.main import COMMAND_GROUPS, build_parser, run_command


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_each_group_registers_its_commands_with_its_own_handlers():
    seen: dict[str, str] = {}
    for group in COMMAND_GROUPS:
        assert "register" in group.__all__
        parser = argparse.ArgumentParser()
        group.register(parser.add_subparsers(dest="command"))
        for name, sub in _subcommands(parser).items():
            assert name not in seen, f"{name} registered by {seen.get(name)} and {group.__name__}"
            seen[name] = group.__name__
            handler = sub.get_default("func")
            assert handler.__module__ == group.__name__, (name, handler)
    assert set(_subcommands(build_parser())) == set(seen)
    assert {"train", "compile", "check", "bench", "keygen", "encrypt", "decrypt", "predict", "run", "serve",
            "openapi", "deploy", "demo"} <= set(seen)


def test_shared_options_keep_their_names_and_defaults():
    subs = _subcommands(build_parser())
    args = subs["compile"].parse_args(["m.pt", "--data", "digits", "--out", "m.gravel"])
    # no bit width given: the compiler's post-training search, starting from QuantConfig's defaults
    assert (args.in_bits, args.w_bits, args.a_bits, args.tlu_bits, args.rounding, args.p_error, args.shards,
            args.calib) == (None, None, None, None, "auto", 0.01, None, 500)  # shards: 1, or bench's workers
    from gravel.cli.options import quant_config
    from gravel.compiler import QuantConfig

    assert quant_config(args) == QuantConfig(search=True)
    given = subs["compile"].parse_args(["m.pt", "--data", "digits", "--out", "m.gravel", "--tlu-bits", "6"])
    assert quant_config(given) == QuantConfig(tlu_bits=6, search=False)
    args = subs["encrypt"].parse_args(["a.gravel", "--secret", "s", "--out", "x.ct"])
    assert (args.data, args.index, args.image) == ("digits", 0, None)
    with pytest.raises(SystemExit):
        subs["check"].parse_args(["m.pt"])  # --data is required there


def test_a_gravel_error_is_one_line_and_status_2(capsys):
    assert run_command(["train", "--data", "digits", "--arch", "nope", "--out", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gravel train: error: unknown architecture 'nope'; choose one of ") and err.count("\n") == 1


CHECK = {
    "supported": True, "input_shape": [1, 8, 8], "samples": 500, "accuracy_float": 0.95, "accuracy_quantized": 0.93,
    "simulated_samples": 100, "accuracy_simulated": 0.92, "simulation_agreement": 0.99, "encrypted_samples": 3,
    "accuracy_encrypted": 1.0, "encrypted_agreement": 1.0, "latency_s": 0.1234, "eval_key_bytes": 62_640_806,
    "table_lookups": 26, "eval_key_bytes_estimate": 120_000_000, "latency_estimate_s": 0.5, "warnings": [],
    "stages": [{"stage": "stage0", "layers": "fc1, relu", "ops": "linear+lut", "table_lookups": 16,
                "lookup_bits": {"5": 16}, "shards": 4}],
}


def test_check_table():
    from gravel.harness import format_check

    lines = format_check(CHECK).splitlines()
    assert lines[0] == "model input (1, 8, 8); accuracy on 500 test samples: float 0.9500, quantized 0.9300"
    assert lines[1].split() == ["stage", "ops", "lookups", "bits:count", "shards", "layers"]
    assert lines[2].split() == ["stage0", "linear+lut", "16", "5:16", "4", "fc1,", "relu"]
    assert lines[3] == ("table lookups 26; evaluation keys about 120.0 MB (uncompressed), "
                        "about 0.5 s per inference here")
    assert lines[4] == "FHE simulation on 100 samples: accuracy 0.9200, agreement with the quantized model 0.990"
    assert lines[5] == ("real encryption on 3 samples: accuracy 1.0000, agreement 1.000, 0.12 s each, "
                        "evaluation keys 62.6 MB") and len(lines) == 6
    brief = {k: v for k, v in CHECK.items() if k not in ("accuracy_encrypted", "latency_estimate_s")}
    brief["simulated_samples"] = 0
    assert format_check(brief).splitlines()[3] == "table lookups 26; evaluation keys about 120.0 MB (uncompressed)"
    assert len(format_check(brief).splitlines()) == 4


def test_bench_lines():
    from gravel.harness import format_bench

    assert format_bench({"model": "digits", "latency_s": 0.5}).splitlines() == [
        f"{'model':20} digits", f"{'latency_s':20} 0.5"]
