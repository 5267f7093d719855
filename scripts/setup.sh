#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install everything into it. Idempotent: a stamp
# records what was installed; nothing is reinstalled while pyproject.toml and this script are unchanged.
#   scripts/setup.sh            runtime
#   scripts/setup.sh test       runtime + test tools
# Env: TRITONVLM_VENV (default .venv), PYTHON (default python3), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${TRITONVLM_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "setup: Python >= 3.10 is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 1; }

want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16) extras=$EXTRAS torch=$TORCH_SPEC"
stamp="$VENV/.tritonvlm-setup"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
  exit 0
fi

start=$(date +%s)
echo "setup: preparing $VENV" >&2
# A venv left half-made by an interrupted run (no pip in it) is made again.
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }; then
  "$PYTHON" -m venv --clear "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
echo "setup: installing $TORCH_SPEC" >&2
pip install "$TORCH_SPEC"
# The tritonserver binary, python backend and stubs ship in this wheel; --no-deps because it pins an
# old numpy/tritonclient and its Python API is not used. Skipped where tritonserver is on PATH (NGC).
if ! command -v tritonserver >/dev/null 2>&1; then
  echo "setup: installing the tritonserver binary (nvidia-pytriton wheel, no deps)" >&2
  pip install --no-deps "nvidia-pytriton==0.7.0"
fi
spec="$ROOT"
[ -n "$EXTRAS" ] && spec="${ROOT}[$EXTRAS]"
echo "setup: installing tritonvlm ($spec)" >&2
pip install -e "$spec"
echo "$want" > "$stamp"
echo "setup: done in $(( $(date +%s) - start ))s" >&2
