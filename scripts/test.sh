#!/usr/bin/env bash
# The README's test command: install what is needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test files run in 3 processes (most tests wait on servers, Ray workers or subprocesses more
# than they compute); a file stays in one process, so its module fixtures are built once, and
# the files that start Ray share one process (tests/conftest.py).
exec .venv/bin/python -m pytest -q -n 3 --dist loadgroup "$@"
