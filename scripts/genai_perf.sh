#!/usr/bin/env bash
# Benchmark the OpenAI frontend (/v1/chat/completions, streaming, one image per request) with genai-perf.
#
#   scripts/genai_perf.sh                             start a server on free loopback ports, run, stop it
#   scripts/genai_perf.sh --model DIR                 the same with another model (default: built-in tiny)
#   scripts/genai_perf.sh --model-repository DIR      ... and another Triton model repository
#   scripts/genai_perf.sh --url HOST:PORT --model-name NAME --tokenizer DIR   a running server
#   scripts/genai_perf.sh --concurrency 1 --measurement-interval 4000 -- [more genai-perf flags]
#
# genai-perf (the `genai-perf` wheel) lives in its own venv (.venv-genai-perf); it drives perf_analyzer,
# which comes from scripts/perf_analyzer.sh's venv (.venv-perf: tritonclient[all]==2.51.0 and its
# libraries), put first on PATH and LD_LIBRARY_PATH. Nothing is fetched from a model hub: the
# tokenizer is the served model's own directory, and genai-perf draws the images itself (PNG,
# --image-size pixels square). Each request: ~32 text tokens + one image, 32 output tokens with
# ignore_eos. Per concurrency level: the console table, plus genai-perf's CSV/JSON, under
# .state/genai_perf/<time>/.
# Env: GENAI_PERF_VENV (default .venv-genai-perf), PERF_VENV (default .venv-perf),
#      TRITONVLM_VENV (default .venv), PYTHON (default python3), GP_TIMEOUT (seconds per level, 300).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GENAI_PERF_VENV=${GENAI_PERF_VENV:-$ROOT/.venv-genai-perf}
PERF_VENV=${PERF_VENV:-$ROOT/.venv-perf}
VENV=${TRITONVLM_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
GP_TIMEOUT=${GP_TIMEOUT:-300}
GENAI_PERF_SPEC="genai-perf==0.0.16"

url=""
model=""
model_repository=""
model_name=""
tokenizer=""
# Concurrency 1 by default: with perf_analyzer 2.51 in its OpenAI mode, runs at concurrency > 1 never
# finish their measurement here (the server answers every request; genai-perf waits until
# GP_TIMEOUT). Pass --concurrency "1 4" with a newer perf_analyzer on PATH.
concurrency="1"
# Time windows, not a request count: perf_analyzer 2.51 (which genai-perf drives here) keeps sending
# past --request-count at concurrency > 1 with the openai service kind.
measurement_interval=4000
image_size=64
extra=()
usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --model-repository) model_repository=$2; shift 2 ;;
    --model-name) model_name=$2; shift 2 ;;
    --tokenizer) tokenizer=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --measurement-interval) measurement_interval=$2; shift 2 ;;
    --image-size) image_size=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "genai_perf.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "genai_perf.sh: $*" >&2; }
if [ -n "$url" ] && { [ -z "$model_name" ] || [ -z "$tokenizer" ]; }; then
  log "--url needs --model-name (the served model name) and --tokenizer (a local tokenizer directory)"
  exit 2
fi

# ---- the project's venv (to start the server), then perf_analyzer 2.51 + its libraries ----
if [ -z "$url" ] && [ ! -x "$VENV/bin/tritonvlm" ]; then
  TRITONVLM_VENV="$VENV" "$ROOT/scripts/setup.sh"
fi
PERF_VENV="$PERF_VENV" TRITONVLM_VENV="$VENV" "$ROOT/scripts/perf_analyzer.sh" --setup-only
export PATH="$PERF_VENV/bin:$PATH"
export LD_LIBRARY_PATH="$PERF_VENV/pa-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# ---- genai-perf in its own venv, idempotent via a stamp ----
stamp="$GENAI_PERF_VENV/.genai-perf-setup"
if ! { [ -x "$GENAI_PERF_VENV/bin/genai-perf" ] && [ -f "$stamp" ] && grep -qxF "$GENAI_PERF_SPEC" "$stamp"; }; then
  log "installing $GENAI_PERF_SPEC into $GENAI_PERF_VENV"
  [ -x "$GENAI_PERF_VENV/bin/python" ] || "$PYTHON" -m venv "$GENAI_PERF_VENV"
  echo '*' > "$GENAI_PERF_VENV/.gitignore"  # keep the venv out of git status and ruff
  "$GENAI_PERF_VENV/bin/python" -m pip install --disable-pip-version-check -q "$GENAI_PERF_SPEC"
  echo "$GENAI_PERF_SPEC" > "$stamp"
fi
# No hub: the tokenizer is a local directory; fail fast instead of trying to download anything.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

out="$ROOT/.state/genai_perf/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"

# ---- start `tritonvlm serve` on free loopback ports unless --url was given ----
LOG_PREFIX=genai_perf.sh
# shellcheck source=scripts/lib/background_server.sh
source "$ROOT/scripts/lib/background_server.sh"
if [ -z "$url" ]; then
  if [ -z "$model" ]; then  # the built-in model
    model=$("$VENV/bin/python" -c 'from tritonvlm.cli import default_model; print(default_model())')
  fi
  model_name=${model_name:-tritonvlm}
  tokenizer=${tokenizer:-$model}
  serve_args=(--model "$model" --served-model-name "$model_name")
  [ -n "$model_repository" ] && serve_args+=(--model-repository "$model_repository")
  start_background_server "$VENV" "$out" "${serve_args[@]}"
  url="127.0.0.1:$api_port"
  log "server healthy: OpenAI API http://$url/v1 (model $model_name)"
fi

# ---- one genai-perf run per concurrency level ----
status=0
for c in $concurrency; do
  cmd=("$GENAI_PERF_VENV/bin/genai-perf" profile -m "$model_name" --endpoint-type multimodal --streaming
    -u "$url" --tokenizer "$tokenizer"
    --image-width-mean "$image_size" --image-height-mean "$image_size" --image-format png
    --synthetic-input-tokens-mean 32 --synthetic-input-tokens-stddev 0
    --output-tokens-mean 32 --output-tokens-stddev 0 --extra-inputs ignore_eos:true
    --num-dataset-entries 16 --random-seed 0
    --concurrency "$c" --measurement-interval "$measurement_interval" --warmup-request-count 2
    --artifact-dir "$out/concurrency$c" "${extra[@]}")
  log "${cmd[*]}"
  rc=0
  timeout "$GP_TIMEOUT" "${cmd[@]}" 2>&1 | tee "$out/concurrency$c.txt" || rc=$?
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && log "concurrency $c ran past GP_TIMEOUT=${GP_TIMEOUT}s"
    status=$rc
    break
  fi
done
log "results: $out"
exit "$status"
