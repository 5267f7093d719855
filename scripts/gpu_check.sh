#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU and no network (the lent H200: torch and an
# older transformers preinstalled). Installs the project's pinned Python packages from wheels carried
# in .wheels/ (fill it here first with `scripts/gpu_check.sh --download`), then runs the GPU tests and
# the engine benchmark, writing everything under $OUT (default ./gpu-out).
#   scripts/gpu_check.sh --download        # on a machine with the package registry: fill .wheels/
#   OUT=/some/dir scripts/gpu_check.sh      # on the GPU machine
# The default time limits of its parts add up to 600 s, one call of a lent machine; SKIP_ASYNC,
# SKIP_LONG, SKIP_CHUNKED and SKIP_VISION leave parts out, *_TIMEOUT variables change the limits.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WHEELS="$ROOT/.wheels"
# The project's pinned transformers, llguidance and ml_dtypes; their dependencies come along (numpy
# and torch are the GPU image's). The lent H200's python3 is 3.12.
PINNED="transformers==5.23.0 llguidance==1.9.1 ml_dtypes==0.5.4"

if [ "${1:-}" = "--download" ]; then
  mkdir -p "$WHEELS"
  "${PYTHON:-python3}" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
    --platform any -d "$WHEELS" $PINNED
  rm -f "$WHEELS"/numpy-*.whl
  du -sh "$WHEELS"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "[gpu-check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
log "python $($PY --version 2>&1); torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu_check.log" || true
if [ -d "$WHEELS" ]; then
  log "installing $PINNED from the carried wheels (no index; what is installed and fits stays)"
  $PY -m pip install -q --no-index --find-links "$WHEELS" $PINNED 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log" || true
log "transformers $($PY -c 'import transformers; print(transformers.__version__)')"

log "GPU tests (every family, fp32 and bf16)"
timeout "${TEST_TIMEOUT:-225}" $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  --basetemp="$OUT/pytest" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 || log "GPU tests failed or timed out"

log "engine benchmark: qwen2.5-vl-7b shape, bf16, CUDA graphs; decode attention kernel and gathered blocks side by side"
timeout "${BENCH_TIMEOUT:-135}" $PY scripts/bench_engine.py --shape qwen2.5-vl-7b --decode-attention compare \
  --skip-generate --batches "${BATCHES:-1,16,64,128,256}" --json "$OUT/bench_engine.json" 2>&1 \
  | tee "$OUT/bench_engine.txt" | tail -12 || log "engine benchmark failed or timed out"
log "engine benchmark, Triton kernels off (gathered blocks, transformers' RMSNorm): batch 1 and 16"
timeout "${OFF_TIMEOUT:-45}" $PY scripts/bench_engine.py --shape qwen2.5-vl-7b --decode-attention gather \
  --fused-ops false --skip-generate --batches 1,16 --json "$OUT/bench_engine_off.json" 2>&1 \
  | tee "$OUT/bench_engine_off.txt" | tail -6 || log "engine benchmark (kernels off) failed or timed out"
if [ -z "${SKIP_ASYNC:-}" ]; then
  log "engine benchmark: async scheduling (default), async output alone, neither: batch 128 and 256"
  timeout "${ASYNC_TIMEOUT:-55}" $PY scripts/bench_engine.py --shape qwen2.5-vl-7b --async-scheduling compare \
    --skip-generate --batches 128,256 --json "$OUT/bench_engine_sync.json" 2>&1 \
    | tee "$OUT/bench_engine_sync.txt" | tail -6 || log "engine benchmark (async settings) failed or timed out"
fi
if [ -z "${SKIP_LONG:-}" ]; then
  log "engine benchmark, mixed lengths: one request of each batch with a 4,000-token prompt"
  timeout "${LONG_TIMEOUT:-60}" $PY scripts/bench_engine.py --shape qwen2.5-vl-7b --decode-attention compare \
    --skip-generate --batches "${LONG_BATCHES:-16,128}" --long-prompt-tokens 4000 \
    --json "$OUT/bench_engine_long.json" 2>&1 | tee "$OUT/bench_engine_long.txt" | tail -10 \
    || log "mixed-length engine benchmark failed or timed out"
fi
if [ -z "${SKIP_CHUNKED:-}" ]; then
  log "chunked prefill: 32 sequences decoding when an 8,000-token prompt arrives (7B shape, bf16)"
  timeout "${CHUNKED_TIMEOUT:-40}" $PY scripts/bench_chunked_prefill.py --shape qwen2.5-vl-7b \
    --json "$OUT/bench_chunked_prefill.json" 2>&1 | tee "$OUT/bench_chunked_prefill.txt" | tail -8 \
    || log "chunked-prefill benchmark failed or timed out"
fi
if [ -z "${SKIP_VISION:-}" ]; then
  log "vision tower: Qwen2.5-VL-7B shape, bf16, per-window loop vs varlen attention, 448/896/1344 and a batch"
  timeout "${VISION_TIMEOUT:-40}" $PY scripts/bench_vision.py --shape qwen2.5-vl-7b \
    --json "$OUT/bench_vision.json" 2>&1 | tee "$OUT/bench_vision.txt" | tail -8 \
    || log "vision benchmark failed or timed out"
fi
if [ -n "${MLLAMA:-}" ]; then
  log "Llama 3.2 Vision: 11B shape, bf16 (KV and cross-attention state bytes, text/image/mixed batches)"
  timeout "${MLLAMA_TIMEOUT:-80}" $PY scripts/bench_mllama.py --shape 11b --batches 1 16 64 2>&1 \
    | tee "$OUT/bench_mllama.txt" | tail -12 || log "mllama benchmark failed or timed out"
fi
log "done; outputs in $OUT"
