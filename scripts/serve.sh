#!/usr/bin/env bash
# Set everything up (once) and serve: ./scripts/serve.sh [tritonvlm serve flags, e.g. --model DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
exec "${TRITONVLM_VENV:-$ROOT/.venv}/bin/tritonvlm" serve "$@"
