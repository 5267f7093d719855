#!/usr/bin/env python
"""Sliding-window layers at a real checkpoint's shape, with random weights built from its config alone.

Prints what one sequence's keys/values take with the engine's layout (sliding layers keep a ring of
``window`` columns, global layers every token) against full-length keys/values in every layer. With
``--run`` it also builds the model on ``--device`` and checks, greedy, that the engine gives
transformers' ``generate()`` tokens for prompts and generations longer than the window (token-exact in
float32; bfloat16 rounding may differ with the batch shape, so there it prints how far they agree),
then prints decode step times and the KV memory actually allocated.

    python scripts/bench_sliding_window.py --config bench/configs/gemma-3-4b-it.json
    python scripts/bench_sliding_window.py --config google/gemma-3-4b-it --run --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
from tritonvlm.engine.kv_cache import PagedKVCache
from tritonvlm.families import family_for_config
from tritonvlm.families.base import FULL, Family


def load_config(source: str) -> Any:
    """A transformers config from a ``config.json`` file, a checkpoint directory or a hub id."""
    path = Path(source)
    if path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(path.read_text())
            return AutoConfig.from_pretrained(tmp)
    return AutoConfig.from_pretrained(source)


def kv_table(family: Family, contexts: list[int], dtype: torch.dtype) -> None:
    kinds = family.layer_kinds()
    heads, dim = family.kv_geometry()
    windows = sorted({k.window for k in kinds if k.is_sliding})
    sliding = sum(k.is_sliding for k in kinds)
    full_per_token = PagedKVCache.bytes_per_token(len(kinds), heads, dim, dtype)
    print(
        f"{family.name}: {len(kinds)} layers ({sliding} sliding, window {windows or '-'}), {heads} kv heads "
        f"x {dim}, {dtype}: {full_per_token} bytes per token with every layer full-length"
    )
    print("| context | full-length, every layer | engine (window ring) | saved | engine bytes/token |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in contexts:
        full = PagedKVCache.bytes_per_sequence([FULL] * len(kinds), heads, dim, n, dtype)
        ring = PagedKVCache.bytes_per_sequence(kinds, heads, dim, n, dtype)
        saved = 1 - ring / full
        print(f"| {n} | {size(full)} | {size(ring)} | {saved:.1%} | {ring // n:,} |")


class IdsOnly:
    """Tokenizer stand-in for random weights: the engine needs decode() for text, nothing is read."""

    eos_token_id = None

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return ""

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return ""


def build(config: Any, family: Family, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = family.model_class._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # run every generation to its length in both
    return model


def text_ids(family: Family) -> int:
    """Random prompt ids are drawn below this: no image placeholders (they would need embeddings)."""
    vocab = int(family.text_config.vocab_size)
    return min(vocab, family.image_token_id or vocab, 200_000)


def size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def parity(model: torch.nn.Module, family: Family, window: int, new_tokens: int) -> bool:
    """Prompts longer than the window, and one that crosses it while decoding, joining one batch."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    lengths = [2 * window + 333, window + 5, max(1, window - new_tokens // 2)]
    prompts = [torch.randint(10, text_ids(family), (n,), generator=gen).tolist() for n in lengths]
    config = EngineConfig(max_model_len=max(lengths) + new_tokens, max_num_seqs=4)
    engine = LLMEngine(model, IdsOnly(), config, family)
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()

    def sink(out: Any) -> None:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
        if out.finished:
            done.add(out.request_id)

    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params, sink)
        engine.step()
    while len(done) < len(prompts):
        engine.step()
    ok = True
    for i, ids in enumerate(prompts):
        inputs = torch.tensor([ids], device=device)
        mask = torch.ones_like(inputs)
        kwargs = {"max_new_tokens": new_tokens, "do_sample": False}
        out = model.generate(input_ids=inputs, attention_mask=mask, **kwargs)
        ref = out[0, len(ids) :].tolist()
        same = agree(tokens[str(i)], ref)
        ok &= same == new_tokens
        print(f"prompt {len(ids)} tokens + {new_tokens} generated: {same}/{new_tokens} equal generate()'s")
    return ok


@torch.inference_mode()
def decode_times(model: Any, family: Family, context: int, batches: list[int], steps: int) -> None:
    device = next(model.parameters()).device
    for batch in batches:
        config = EngineConfig(max_model_len=context + steps + 8, max_num_seqs=batch)
        engine = LLMEngine(model, IdsOnly(), config, family)
        done: list[str] = []
        params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
        gen = torch.Generator().manual_seed(2)
        for i in range(batch):
            ids = torch.randint(10, text_ids(family), (context,), generator=gen).tolist()
            engine.add_request(str(i), ids, params, lambda o, d=done: o.finished and d.append(o.request_id))
        while len(engine.scheduler.running) < batch:  # prefill everyone first
            engine.step()
        for _ in range(3):
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        while len(done) < batch and n < steps - 5:
            engine.step()
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / n * 1e3
        cache = engine.runner.cache
        print(
            f"decode, context {context}, batch {batch}: {ms:.1f} ms/step; KV cache allocated "
            f"{size(cache.nbytes)}: {cache.num_blocks} blocks of {cache.block_size} tokens, "
            f"{cache.max_slots} slots' rings"
        )
        del engine


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--config", required=True, help="config.json, checkpoint directory or hub id")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--dtype", default="bfloat16", help="KV (and --run weights) dtype")
    parser.add_argument("--run", action="store_true", help="build random weights and run the checks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--parity-dtype", default="float32")
    parser.add_argument("--decode-context", type=int, default=8192)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    config = load_config(args.config)
    family = family_for_config(config)
    kv_table(family, args.contexts, getattr(torch, args.dtype))
    if not args.run:
        return
    window = min((k.window for k in family.layer_kinds() if k.is_sliding), default=None)
    if window is None:
        raise SystemExit("no sliding-window layers in this config")
    device = torch.device(args.device)
    model = build(config, family, device, getattr(torch, args.parity_dtype))
    ok = parity(model, family, window, args.new_tokens)
    print(f"parity ({args.parity_dtype}): {'token-exact' if ok else 'DIFFERS'}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build(config, family, device, getattr(torch, args.dtype))
    decode_times(model, family, args.decode_context, args.batches, steps=32)


if __name__ == "__main__":
    main()
