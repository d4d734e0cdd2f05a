#!/usr/bin/env bash
# Create .venv and install Gravel with what it needs. Safe to run again: pip skips what is there.
# The CPU build of torch is installed first (pinned by the machine's local wheel where present),
# otherwise an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PIP=".venv/bin/pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install "torch==2.13.0" 2>/dev/null \
        || $PIP install torch --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -e ".[test]"
# Fashion-MNIST comes from Debian; optional, the tests do not need it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        || echo "note: could not install dataset-fashion-mnist (only needed for --data fashion-mnist)"
fi
