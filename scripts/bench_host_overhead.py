#!/usr/bin/env python
"""The engine's host work per decode step at large batches, with the device's work taken out.

On a GPU a decode step's forward is one CUDA-graph replay and sampling a few kernels; what the host
does around them (recording each row's token, growing its KV blocks, preparing the next step's inputs,
detokenizing, streaming, the gauges) is Python per row, and it counts in the step time wherever the
GPU waits for it. This script measures that work on any machine: the tiny Qwen2.5-VL test model's
engine runs ``--batches`` requests at once with the forward replaced by one that returns zero logits
and the sampler by a fixed token, so what is timed is the host alone. With async output (the engine's
default on CUDA), the text and the gauges are made while the device computes the next step; the rest
is between steps. One table:

    batch | async output | host ms/step | between steps ms | during the device's step ms | µs/row

    .venv/bin/python scripts/bench_host_overhead.py
    .venv/bin/python scripts/bench_host_overhead.py --batches 256 --steps 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

OVERLAPPED = ("_publish", "_update_gauges")  # what async output moves into the device's time
TIMED = (*OVERLAPPED, "_commit", "_take_incoming", "_drop_cancelled", "_retire_stopped")


def timed(obj: Any, name: str, totals: dict[str, float]) -> None:
    """Wrap ``obj.name`` so that its wall time adds up in ``totals[name]``."""
    inner = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def measure(model_dir: Path, batch: int, steps: int, async_output: bool) -> dict[str, float]:
    """Host milliseconds per decode step of ``batch`` rows: in all, and overlapped with the device."""
    import tritonvlm.engine.llm_engine as llm_engine
    from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams

    config = EngineConfig(
        max_num_seqs=batch,
        max_model_len=steps + 64,
        prefix_cache_slots=0,
        cuda_graphs=False,
        async_output="true" if async_output else "false",
    )
    engine = LLMEngine.from_pretrained(str(model_dir), config, device="cpu", dtype="float32")
    done: set[str] = set()
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    prompt = [(7 + 31 * i) % 1500 + 300 for i in range(16)]
    for i in range(batch):
        engine.add_request(str(i), prompt, params, lambda out: out.finished and done.add(out.request_id))
    engine.step()  # the prefill (and a first decode step) with the real model
    vocab = engine.vocab_size
    engine.runner._decode_forward = lambda tokens, *args, **kwargs: torch.zeros(tokens.shape[0], vocab)
    real_sample = llm_engine.sample
    llm_engine.sample = lambda logits, seqs, failures=None: [(7 * i) % 1500 + 300 for i in range(len(seqs))]
    totals: dict[str, float] = defaultdict(float)
    for name in TIMED:
        timed(engine, name, totals)
    try:
        start, first = time.perf_counter(), engine.stats.decode_steps
        while len(done) < batch:
            engine.step()
        elapsed = time.perf_counter() - start
    finally:
        llm_engine.sample = real_sample
    steps_run = engine.stats.decode_steps - first
    overlapped = sum(totals[name] for name in OVERLAPPED) if async_output else 0.0
    return {"total_ms": 1000 * elapsed / steps_run, "overlapped_ms": 1000 * overlapped / steps_run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="64,128,256", help="rows per step (default 64,128,256)")
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per batch (default 100)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from tritonvlm.testmodels.qwen2_5_vl import build_test_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        build_test_model(model_dir, size="tiny")
        for batch in (int(b) for b in args.batches.split(",")):
            for async_output in (False, True):
                result = measure(model_dir, batch, args.steps, async_output)
                rows.append((batch, async_output, result))
                shown = {k: round(v, 3) for k, v in result.items()}
                print(f"[host-overhead] batch {batch}, async output {async_output}: {shown}", file=sys.stderr)
    print("\nhost work per decode step (forward and sampling replaced by stubs; CPU threads: 1)")
    print("| batch | async output | host ms/step | between steps ms | during the device's step ms | µs/row |")
    print("|---|---|---|---|---|---|")
    for batch, async_output, r in rows:
        between = r["total_ms"] - r["overlapped_ms"]
        print(
            f"| {batch} | {'on' if async_output else 'off'} | {r['total_ms']:.2f} | {between:.2f} | "
            f"{r['overlapped_ms']:.2f} | {1000 * between / batch:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
