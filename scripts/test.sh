#!/usr/bin/env bash
# Set up edgeq, then run the default test suite (slow tests excluded: run them with -m slow).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
python -m pytest "$@"
