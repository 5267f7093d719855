#!/usr/bin/env bash
# Set everything up (once) and run the checks: ruff, then pytest (extra args go to pytest).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh" test
VENV=${TRITONVLM_VENV:-$ROOT/.venv}
cd "$ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest "$@"
