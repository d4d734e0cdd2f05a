#!/usr/bin/env bash
# Create .venv-cml/ with Concrete ML 1.9, apart from Gravel's .venv: Concrete ML pins
# concrete-python 2.10, torch 2.3.1 and numpy 1.26, which Gravel's environment must not get.
# Safe to run again: each step is skipped when what it installs is already there.
# torch comes first from PyTorch's CPU index; where that index cannot be reached, PyPI's
# torch 2.3.1 is used (a CUDA build that pulls about 3 GB of nvidia-* wheels; it runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CML_VENV:-.venv-cml}"
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q --no-cache-dir"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if ! "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '2.3.1')" 2>/dev/null; then
    if ! $PIP install --retries 1 --timeout 20 "torch==2.3.1" --index-url https://download.pytorch.org/whl/cpu; then
        echo "note: PyTorch's CPU index is unreachable; installing torch 2.3.1 from PyPI (CUDA build, ~3 GB)" >&2
        $PIP install "torch==2.3.1"
    fi
fi
if ! "$PY" -c "import sys, importlib.metadata as m, concrete.ml; sys.exit(not m.version('concrete-ml').startswith('1.9.'))" 2>/dev/null; then
    $PIP install "concrete-ml==1.9.*"
fi
"$PY" -c "import importlib.metadata as m; print('concrete-ml', m.version('concrete-ml'), 'concrete-python', m.version('concrete-python'), 'torch', m.version('torch'))"
