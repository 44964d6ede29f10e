#!/usr/bin/env bash
# Set up edgeq, then run the main job: the zoo ResNet teacher, mixup-class synthesis, W2A4, for the host target
# (the best target this CPU runs; the summary names it and its latency).
# Extra arguments go to 'edgeq compile' (e.g. --target x86 --bits w4a4 --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
edgeq compile "$@"
