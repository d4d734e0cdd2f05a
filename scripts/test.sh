#!/usr/bin/env bash
# The README's test command: install what is needed, then run the whole suite.
#
# The suite runs as two plain pytest processes at once, one per core (as one process it is
# CPU-bound at about one core):
#   - "apart": the HTTP service's and the SDK's tests, whose servers are subprocesses, and the
#     tests that only compile, simulate or use TenSEAL. This pytest process never runs concrete's server
#     runtime in-process: a process that had run it ended, now and then, in a SIGSEGV later in
#     an HTTP-only test (the cause is inside the runtime and not established).
#   - "main": everything else, including every file that starts Ray (one after another: two
#     Rays at once on a small machine starve each other).
# pytest-xdist lost workers mid-run on the async SDK and Ray tests, so it is not used here.
# Extra arguments go to both processes, e.g. `-x` or `-k NAME`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
LOGS=$(mktemp -d)
APART=(tests/service --ignore=tests/service/test_sdk_cli.py tests/client tests/compiler tests/tensor tests/ckks
       tests/protocol tests/data tests/model tests/harness/test_advice.py tests/harness/test_ckks_bench.py)
# every other test path (a new folder under tests/ lands here), and the Ray-backed SDK file
mapfile -t MAIN < <(ls -d tests/*/ tests/test_*.py | grep -vE "^tests/(service|client|compiler|tensor|ckks|protocol|data|model)/$")
MAIN+=(tests/service/test_sdk_cli.py --ignore=tests/harness/test_advice.py --ignore=tests/harness/test_ckks_bench.py)
$PY -m pytest -q -p no:cacheprovider "${APART[@]}" "$@" >"$LOGS/apart.log" 2>&1 &
apart_pid=$!
status=0
$PY -m pytest -q -p no:cacheprovider "${MAIN[@]}" "$@" || status=$?
apart_status=0
wait "$apart_pid" || apart_status=$?
echo "--- run alongside: ${APART[*]} (exit status $apart_status) ---"
cat "$LOGS/apart.log"
rm -rf "$LOGS"
if [ "$status" -ne 0 ] || [ "$apart_status" -ne 0 ]; then
    exit 1
fi
