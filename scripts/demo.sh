#!/usr/bin/env bash
# The README's main job: set up, then run the whole private path on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gravel demo "$@"
