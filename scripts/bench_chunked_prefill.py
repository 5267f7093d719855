#!/usr/bin/env python
"""How long a long prompt's arrival stalls the sequences already decoding, with and without chunked
prefill (the engine alone, no server).

``--running`` sequences decode (short prompts, greedy, ``ignore_eos``); once they are under way a prompt
of ``--long-tokens`` tokens arrives. For each chunk size (``0``: the whole prompt in one step) the
script prints the running sequences' longest gap between two tokens (the stall), their median gap,
and the long prompt's TTFT; each setting after a warm-up pass of its own:

    python scripts/bench_chunked_prefill.py                       # CPU: medium test model, 2,048-token prompt
    python scripts/bench_chunked_prefill.py --shape qwen2.5-vl-7b --long-tokens 8000 --chunks 0,2048,512
    python scripts/bench_chunked_prefill.py --model-dir DIR      # any model of a served family (e.g. a
                                                                 # Gemma 3 test model: sliding layers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (  # noqa: E402
    add_device_arguments,
    load_decoder,
    log,
    setup_device,
    sync,
    synthetic_prompt,
)


def one_pass(engine: Any, args: Any, long_prompt: list[int], short_prompt: list[int], tag: str) -> dict:
    """Start the running sequences, let them decode ``--lead-steps`` steps, add the long prompt, go on
    until it has its first token and ``--tail-steps`` more steps passed."""
    from tritonvlm.engine import SamplingParams

    stamps: dict[str, list[float]] = {}

    def sink(out: Any) -> None:
        if out.token_ids:
            stamps.setdefault(out.request_id, []).append(time.perf_counter())

    decode = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    for i in range(args.running):
        engine.add_request(f"{tag}-run{i}", short_prompt, decode, sink)
    for _ in range(args.lead_steps):
        engine.step()
    sync(engine.runner.device)
    arrival = time.perf_counter()
    engine.add_request(f"{tag}-long", long_prompt, SamplingParams(max_tokens=4, temperature=0.0), sink)
    while f"{tag}-long" not in stamps:
        engine.step()
    for _ in range(args.tail_steps):
        engine.step()
    sync(engine.runner.device)
    ttft = stamps[f"{tag}-long"][0] - arrival
    for i in range(args.running):
        engine.cancel(f"{tag}-run{i}")
    while engine.scheduler.has_work():
        engine.step()
    gaps = []
    for i in range(args.running):
        times = [t for t in stamps[f"{tag}-run{i}"] if t >= arrival - 1.0]
        gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "ttft_ms": 1000 * ttft,
        "max_gap_ms": 1000 * max(gaps),
        "median_gap_ms": 1000 * statistics.median(gaps),
    }


def load_model_dir(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """``(model stripped for decoding, its family, its tokenizer)`` from a model directory."""
    from transformers import AutoTokenizer

    from tritonvlm.families import family_for_model

    log(f"loading {path} on {device} ({dtype})")
    family = family_for_model(str(path))
    model = family.load_model(str(path), device=str(device), dtype=dtype)
    family.strip_for_decoder(model)
    return model, family, AutoTokenizer.from_pretrained(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default=None, help="medium (CPU default) or a bench_engine shape")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="a model directory instead of --shape (its own weights)"
    )
    parser.add_argument("--running", type=int, default=None, help="sequences decoding (CPU 4, GPU 32)")
    parser.add_argument(
        "--long-tokens", type=int, default=None, help="the arriving prompt (CPU 2048, GPU 8000)"
    )
    parser.add_argument(
        "--chunks", default=None, help="chunk sizes to compare (CPU 0,512,256; GPU 0,2048,512)"
    )
    parser.add_argument(
        "--lead-steps", type=int, default=8, help="decode steps before the long prompt arrives"
    )
    parser.add_argument("--tail-steps", type=int, default=8, help="decode steps after its first token")
    add_device_arguments(parser)
    args = parser.parse_args(argv)

    from tritonvlm.engine import EngineConfig, LLMEngine

    device, dtype, gpu = setup_device(args)
    args.shape = args.shape or ("qwen2.5-vl-7b" if gpu else "medium")
    args.running = args.running or (32 if gpu else 4)
    args.long_tokens = args.long_tokens or (8000 if gpu else 2048)
    chunks = [int(c) for c in (args.chunks or ("0,2048,512" if gpu else "0,512,256")).split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is not None:
            model, family, tokenizer = load_model_dir(args.model_dir, device, dtype)
            args.shape = str(args.model_dir)
        else:
            model, family, tokenizer = load_decoder(args.shape, args.workdir or Path(tmp), device, dtype)
        long_prompt = synthetic_prompt(model, args.long_tokens)
        short_prompt = long_prompt[:32]
        for chunk in chunks:
            config = EngineConfig(
                max_num_seqs=args.running + 1,
                max_model_len=args.long_tokens + 1024,
                max_prefill_tokens=65536,
                prefill_chunk_tokens=chunk,
                prefix_cache_slots=0,  # the same prompt each pass: a cache would skip the prefill
            )
            engine = LLMEngine(model, tokenizer, config, family)
            log(f"chunk {chunk or 'off'}: warm-up pass")
            one_pass(engine, args, long_prompt, short_prompt, "warm")
            row = {"chunk": chunk, **one_pass(engine, args, long_prompt, short_prompt, "run")}
            log(f"chunk {chunk or 'off'}: {json.dumps({k: round(v, 1) for k, v in row.items()})}")
            rows.append(row)
            del engine
            if gpu:
                torch.cuda.empty_cache()
    print(
        f"\n{args.shape} on {device} ({dtype}): {args.running} sequences decoding when a "
        f"{args.long_tokens}-token prompt arrives"
    )
    print("| prefill chunk | longest gap between tokens, ms | median gap, ms | long prompt TTFT, ms |")
    print("|---|---|---|---|")
    for row in rows:
        label = f"{row['chunk']:,} tokens" if row["chunk"] else "off (whole prompt)"
        print(f"| {label} | {row['max_gap_ms']:,.1f} | {row['median_gap_ms']:,.1f} | {row['ttft_ms']:,.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
