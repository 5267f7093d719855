#!/usr/bin/env bash
# Benchmark the Triton pipeline model `vlm` (decoupled, streaming) with Triton's perf_analyzer.
#
#   scripts/perf_analyzer.sh                          start a server on free loopback ports, sweep, stop it
#   scripts/perf_analyzer.sh --model DIR              the same with another model (default: built-in tiny)
#   scripts/perf_analyzer.sh --model-repository DIR   ... and another Triton model repository
#   scripts/perf_analyzer.sh --grpc-url HOST:PORT     benchmark a running Triton (nothing is started)
#   scripts/perf_analyzer.sh --concurrency-range 1:8:2 --request-count 16 -- [more perf_analyzer flags]
#   scripts/perf_analyzer.sh --setup-only             install perf_analyzer and its libraries, then exit
#
# perf_analyzer comes from `tritonclient[all]==2.51.0` (its bin/ ships perf_analyzer 2.51; the
# separate `perf-analyzer` wheels need glibc 2.38), installed once into its own venv (.venv-perf).
# It needs libb64.so.0d and libcudart.so.12: both are in the nvidia-pytriton wheel's
# nvidia_pytriton.libs under hashed names and are linked into .venv-perf/pa-libs (on LD_LIBRARY_PATH).
# Each request is bench/perf_analyzer/vlm_input.json: one user turn with one 64x64 PNG, 32 tokens,
# greedy, ignore_eos. Results (CSV + the console table) go to .state/perf_analyzer/<time>/.
# Env: PERF_VENV (default .venv-perf), TRITONVLM_VENV (default .venv), PYTHON (default python3),
#      PA_TIMEOUT (seconds for the whole sweep, default 600), PA_STALL (seconds without progress
#      before giving up, default 120).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF_VENV=${PERF_VENV:-$ROOT/.venv-perf}
VENV=${TRITONVLM_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
PA_TIMEOUT=${PA_TIMEOUT:-600}
PA_STALL=${PA_STALL:-120}
TRITONCLIENT_SPEC="tritonclient[all]==2.51.0"
PYTRITON_SPEC="nvidia-pytriton==0.7.0"

grpc_url=""
model=""
model_repository=""
concurrency="1:8:2"
request_count=16
input_data="$ROOT/bench/perf_analyzer/vlm_input.json"
setup_only=""
extra=()
usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --grpc-url) grpc_url=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --model-repository) model_repository=$2; shift 2 ;;
    --concurrency-range) concurrency=$2; shift 2 ;;
    --request-count) request_count=$2; shift 2 ;;
    --input-data) input_data=$2; shift 2 ;;
    --setup-only) setup_only=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "perf_analyzer.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "perf_analyzer.sh: $*" >&2; }

# ---- the perf venv: tritonclient[all] (ships bin/perf_analyzer), idempotent via a stamp ----
stamp="$PERF_VENV/.perf-setup"
want="$TRITONCLIENT_SPEC"
if ! { [ -x "$PERF_VENV/bin/perf_analyzer" ] && [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; }; then
  log "installing $TRITONCLIENT_SPEC into $PERF_VENV"
  [ -x "$PERF_VENV/bin/python" ] || "$PYTHON" -m venv "$PERF_VENV"
  echo '*' > "$PERF_VENV/.gitignore"  # keep the venv out of git status and ruff
  "$PERF_VENV/bin/python" -m pip install --disable-pip-version-check -q "$TRITONCLIENT_SPEC"
  echo "$want" > "$stamp"
fi

# ---- the server side (only when we start it): the project's venv, set up by setup.sh if missing ----
if [ -z "$grpc_url" ] && [ -z "$setup_only" ] && [ ! -x "$VENV/bin/tritonvlm" ]; then
  TRITONVLM_VENV="$VENV" "$ROOT/scripts/setup.sh"
fi

# ---- libb64.so.0d + libcudart.so.12 for perf_analyzer, linked from nvidia_pytriton.libs ----
libdir="$PERF_VENV/pa-libs"
mkdir -p "$libdir"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing_libs() { LC_ALL=C ldd "$PERF_VENV/bin/perf_analyzer" | grep "not found" || true; }
if [ -n "$(missing_libs)" ]; then
  wheel_libs() {  # the nvidia_pytriton.libs folder of a venv, if it has the wheel
    [ -x "$1/bin/python" ] || return 0
    "$1/bin/python" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("pytriton")
if spec and spec.submodule_search_locations:
    libs = pathlib.Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    if libs.is_dir():
        print(libs)
EOF
  }
  src=$(wheel_libs "$VENV")
  if [ -z "$src" ]; then
    src=$(wheel_libs "$PERF_VENV")
    if [ -z "$src" ]; then
      log "no nvidia_pytriton.libs in $VENV: installing $PYTRITON_SPEC (no deps) into $PERF_VENV"
      "$PERF_VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps "$PYTRITON_SPEC"
      src=$(wheel_libs "$PERF_VENV")
    fi
  fi
  for pair in "libb64-*.so.0d:libb64.so.0d" "libcudart-*.so.12*:libcudart.so.12"; do
    # shellcheck disable=SC2206  # the pattern must glob
    found=("$src"/${pair%%:*})
    [ -e "${found[0]}" ] || { log "no ${pair%%:*} in ${src:-any nvidia_pytriton.libs}"; exit 1; }
    ln -sfn "${found[0]}" "$libdir/${pair##*:}"
  done
  if [ -n "$(missing_libs)" ]; then
    log "perf_analyzer still misses libraries: $(missing_libs)"
    exit 1
  fi
fi

[ -n "$setup_only" ] && exit 0

out="$ROOT/.state/perf_analyzer/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"

# ---- start `tritonvlm serve` on free loopback ports unless --grpc-url was given ----
LOG_PREFIX=perf_analyzer.sh
# shellcheck source=scripts/lib/background_server.sh
source "$ROOT/scripts/lib/background_server.sh"
if [ -z "$grpc_url" ]; then
  serve_args=()
  [ -n "$model" ] && serve_args+=(--model "$model")
  [ -n "$model_repository" ] && serve_args+=(--model-repository "$model_repository")
  start_background_server "$VENV" "$out" "${serve_args[@]}"
  grpc_url="127.0.0.1:$grpc_port"
  log "server healthy: OpenAI API http://127.0.0.1:$api_port/v1, Triton gRPC $grpc_url"
fi

# ---- the sweep: streaming gRPC, bounded windows, a hard time limit ----
# Three windows of --request-count requests per concurrency level, averaged: on a shared CPU the
# throughput never passes perf_analyzer's stability test, so it is switched off (999%, as genai-perf
# does) and the window count bounds the run instead.
cmd=("$PERF_VENV/bin/perf_analyzer" -m vlm -i grpc -u "$grpc_url" --streaming
  --input-data "$input_data" --concurrency-range "$concurrency"
  --measurement-mode count_windows --measurement-request-count "$request_count"
  --stability-percentage 999 --max-trials 3 -v -f "$out/perf_analyzer.csv" "${extra[@]}")
log "${cmd[*]}"
# perf_analyzer waits forever for a request that never finishes (a failed request: "Failed to
# retrieve results from inference request."; or a server that stopped answering): it is stopped
# a few seconds after saying so, after PA_STALL seconds without a new line (-v prints one per
# measurement window), or at PA_TIMEOUT.
"${cmd[@]}" > "$out/perf_analyzer.txt" 2>&1 &
pa_pid=$!
tail -n +1 -f --pid="$pa_pid" "$out/perf_analyzer.txt" &
tail_pid=$!
status=0
start=$SECONDS
last_size=-1
last_change=$SECONDS
while kill -0 "$pa_pid" 2>/dev/null; do
  size=$(wc -c < "$out/perf_analyzer.txt")
  if [ "$size" -ne "$last_size" ]; then
    last_size=$size
    last_change=$SECONDS
  fi
  if grep -q "Failed to retrieve results" "$out/perf_analyzer.txt" \
    || [ $((SECONDS - last_change)) -ge "$PA_STALL" ] || [ $((SECONDS - start)) -ge "$PA_TIMEOUT" ]; then
    [ $((SECONDS - last_change)) -ge "$PA_STALL" ] && log "no progress for ${PA_STALL}s: stopping perf_analyzer"
    sleep 5
    kill -INT "$pa_pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pa_pid" 2>/dev/null && sleep 1; done
    kill -KILL "$pa_pid" 2>/dev/null || true
    status=1
    break
  fi
  sleep 1
done
wait "$pa_pid" 2>/dev/null || status=$?
wait "$tail_pid" 2>/dev/null || true
if grep -q "Failed to retrieve results" "$out/perf_analyzer.txt"; then
  log "a request failed (see above; server log: $out/server/tritonserver.log)"
elif [ "$status" -ne 0 ]; then
  log "perf_analyzer failed (status $status) or ran past PA_TIMEOUT=${PA_TIMEOUT}s"
fi
if [ -f "$out/perf_analyzer.csv" ]; then
  echo
  echo "== $out/perf_analyzer.csv"
  cat "$out/perf_analyzer.csv"
fi
exit "$status"
