"""The Concrete ML comparison's own logic: argument checks, the summary, the rounding option.

The measurement itself needs Concrete ML's 6 GB environment and minutes per image, so it is
run by hand (benchmarks/concrete_ml_compare.py), not here.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return _load("concrete_ml_compare")


def test_summary_takes_each_side_s_fastest_working_path(compare):
    results = {
        "gravel_ptq": {"latency_s": 3.0, "accuracy_encrypted": 0.96},
        "cml_qat": {"latency_s": 5.0, "accuracy_encrypted": 0.95},
        "cml_ptq": {"latency_s": 4.0, "accuracy_encrypted": 0.97},
    }
    s = compare.summarise(results)
    assert (s["gravel_best_path"], s["cml_best_path"]) == ("gravel_ptq", "cml_ptq")
    assert s["ratio_gravel_best_to_cml_best"] == 0.75
    assert s["accuracy_gravel_best_minus_cml_best"] == pytest.approx(-0.01)
    results["cml_ptq"] = {"error": "RuntimeError: 17-bit table lookup"}
    s = compare.summarise(results)
    assert s["cml_best_path"] == "cml_qat" and s["ratio_gravel_best_to_cml_best"] == 0.6
    assert "simulated_2000_gravel_best_minus_cml_best" not in s
    results["gravel_ptq"]["accuracy_simulated_2000"] = 0.92
    results["cml_qat"]["accuracy_simulated_2000"] = 0.895
    s = compare.summarise(results)
    assert s["simulated_2000_gravel_best_minus_cml_best"] == pytest.approx(0.025)
    s = compare.summarise({"gravel_ptq": {"error": "x"}, "cml_qat": results["cml_qat"]})
    assert s["gravel_best_path"] is None and "ratio_gravel_best_to_cml_best" not in s


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--paths", "gravel_ptq,cml_fast"], ["--paths", "cml_fast"]),
        (["--samples", "0"], ["--samples"]),
        (["--cml-p-error", "often"], ["--cml-p-error", "often"]),
        (["--cml-p-error", "2"], ["--cml-p-error"]),
    ],
)
def test_bad_options_are_refused_before_any_work(args, names, tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "concrete_ml_compare.py"), *args],
                       check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert all(n in r.stderr for n in names), r.stderr
    assert r.stdout == ""


def test_rounding_option():
    inner = _load("concrete_ml_inner")
    assert inner.parse_rounding("none") is None
    assert inner.parse_rounding("6") == {"n_bits": 6, "method": "exact"}
    assert inner.parse_rounding("7:Approximate") == {"n_bits": 7, "method": "approximate"}
    for bad in ("six", "6:fast", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--rounding"):
            inner.parse_rounding(bad)
