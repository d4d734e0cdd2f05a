#!/usr/bin/env bash
# The README's test command: install what is needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test files without Ray run in 3 processes (most tests wait on servers or subprocesses more
# than they compute; a file stays in one process, so its module fixtures are built once); then
# the files that start Ray run in one plain process (tests/conftest.py says why).
# pytest's status 5 (no test selected, e.g. when "$@" names files of one group only) is no failure.
status=0
run() { .venv/bin/python -m pytest -q "$@" || { rc=$?; [ "$rc" -eq 5 ] || status=$rc; }; }
run -n 3 --dist loadgroup -m "not ray" "$@"
run -m ray "$@"
exit $status
