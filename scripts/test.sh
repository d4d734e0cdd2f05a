#!/usr/bin/env bash
# The README's test command: install what is needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One plain pytest process. (Running files in pytest-xdist processes made the suite faster but
# lost workers mid-run: the SDK test, whose async client runs concrete in threads, and tests
# that start Ray; both pass in a plain process. tests/conftest.py still groups files for xdist,
# so `bash scripts/test.sh -n 3 --dist loadgroup -m "not ray"` works for local iteration.)
exec .venv/bin/python -m pytest -q "$@"
