#!/usr/bin/env python
"""KV cache layouts compared: the engine's KV cache (blocks written in place) vs join-by-padding.

Join-by-padding (the approach first verified for this project) keeps the running batch in one
transformers ``DynamicCache``, left-padded: a new sequence is prefilled alone, then every layer's
keys/values of both caches are padded to a common length and concatenated, and every decode step
concatenates the new token onto the whole cache. The engine's cache (``tritonvlm.engine.kv_cache``,
a preallocated slot per sequence when this was first measured, blocks by use since) writes each
token in place and joins by writing only the new prompt.

Both decode the same greedy requests arriving every ``--join-every`` steps; the script prints
tokens/s for each and checks they produced the same tokens.

    python scripts/bench_kv.py --size medium --batch 8 --tokens 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
from tritonvlm.modeling.processor import load_model, load_processor
from tritonvlm.testmodels.qwen2_5_vl import build_test_model


def prompts(tokenizer, n: int, repeat: int = 1) -> list[list[int]]:
    """Prompts of varied lengths (``repeat`` scales them)."""
    sentence = "tell me about the red circle and the blue square. "
    texts = [f"Request {i}: " + sentence * (repeat * (1 + i % 4)) for i in range(n)]
    return [tokenizer(t)["input_ids"] for t in texts]


def run_slot_engine(
    model, tokenizer, reqs: list[list[int]], tokens: int, join_every: int
) -> tuple[float, dict]:
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=len(reqs), max_model_len=1024))
    out: dict[str, list[int]] = {}
    done: set[str] = set()

    def sink(o) -> None:
        out.setdefault(o.request_id, []).extend(o.token_ids)
        if o.finished:
            done.add(o.request_id)

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start, step, pending = time.perf_counter(), 0, list(enumerate(reqs))
    while pending or len(done) < len(reqs):
        if pending and step % join_every == 0:
            i, ids = pending.pop(0)
            engine.add_request(str(i), ids, params, sink)
        engine.step()
        step += 1
    return time.perf_counter() - start, out


@torch.inference_mode()
def run_padded_join(model, reqs: list[list[int]], tokens: int, join_every: int) -> tuple[float, dict]:
    """Text-only continuous batching with a left-padded DynamicCache (1-D positions suffice here)."""
    from transformers import DynamicCache

    lm, head, embed = model.model.language_model, model.lm_head, model.model.get_input_embeddings()
    cache, mask, ids_run, pos_run, last, out = None, None, [], None, None, {}
    start, step, pending = time.perf_counter(), 0, list(enumerate(reqs))
    while pending or ids_run:
        if pending and step % join_every == 0:
            i, ids = pending.pop(0)
            new_cache = DynamicCache(config=model.config.get_text_config())
            x = torch.tensor([ids])
            pos = torch.arange(len(ids))[None]
            h = lm(inputs_embeds=embed(x), position_ids=pos, past_key_values=new_cache, use_cache=True)
            tok = head(h.last_hidden_state[:, -1]).argmax(-1)
            out[str(i)] = [int(tok)]
            new_mask = torch.ones(1, len(ids), dtype=torch.long)
            if cache is None:
                cache, mask, pos_run, last = new_cache, new_mask, torch.tensor([len(ids)]), tok
            else:
                length = max(mask.shape[1], new_mask.shape[1])
                for old_layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
                    pad_old, pad_new = length - old_layer.keys.shape[2], length - new_layer.keys.shape[2]
                    old_layer.keys = torch.cat(
                        [F.pad(old_layer.keys, (0, 0, pad_old, 0)), F.pad(new_layer.keys, (0, 0, pad_new, 0))]
                    )
                    old_layer.values = torch.cat(
                        [
                            F.pad(old_layer.values, (0, 0, pad_old, 0)),
                            F.pad(new_layer.values, (0, 0, pad_new, 0)),
                        ]
                    )
                mask = torch.cat(
                    [
                        F.pad(mask, (length - mask.shape[1], 0)),
                        F.pad(new_mask, (length - new_mask.shape[1], 0)),
                    ]
                )
                pos_run = torch.cat([pos_run, torch.tensor([len(ids)])])
                last = torch.cat([last, tok])
            ids_run.append(str(i))
        # one decode step for everyone
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.long)], dim=1)
        h = lm(
            inputs_embeds=embed(last[:, None]),
            attention_mask=mask,
            position_ids=pos_run[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        last = head(h.last_hidden_state[:, -1]).argmax(-1)
        pos_run = pos_run + 1
        keep = []
        for row, rid in enumerate(ids_run):
            if len(out[rid]) < tokens:
                out[rid].append(int(last[row]))
            if len(out[rid]) < tokens:
                keep.append(row)
        if len(keep) < len(ids_run):
            index = torch.tensor(keep, dtype=torch.long)
            cache.batch_select_indices(index)
            mask, pos_run, last = mask[index], pos_run[index], last[index]
            ids_run = [ids_run[r] for r in keep]
            if not ids_run:
                cache = None
        step += 1
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "medium"], default="medium")
    parser.add_argument("--model-dir", type=Path, help="existing model dir (default: build the test model)")
    parser.add_argument("--batch", type=int, default=8, help="requests (they overlap in the batch)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--join-every", type=int, default=8, help="steps between arrivals")
    parser.add_argument("--prompt-repeat", type=int, default=1, help="scales the prompt lengths")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is kept")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or build_test_model(
        Path(tempfile.gettempdir()) / f"tritonvlm-{args.size}", args.size
    )
    model, tokenizer = load_model(str(model_dir)), load_processor(str(model_dir)).tokenizer
    reqs = prompts(tokenizer, args.batch, args.prompt_repeat)
    total = args.batch * args.tokens
    print(
        f"{args.batch} requests x {args.tokens} tokens, prompts of {min(map(len, reqs))}-"
        f"{max(map(len, reqs))} tokens, one arriving every {args.join_every} steps "
        f"({args.size} model, {args.threads} threads)"
    )
    run_slot_engine(model, tokenizer, reqs[:2], 4, 1)  # warm-up
    slot_s = pad_s = float("inf")
    for r in range(args.rounds):  # alternate, so background load hits both alike
        s, slot_out = run_slot_engine(model, tokenizer, reqs, args.tokens, args.join_every)
        p, pad_out = run_padded_join(model, reqs, args.tokens, args.join_every)
        slot_s, pad_s = min(slot_s, s), min(pad_s, p)
        print(f"  round {r + 1}: engine {total / s:.1f}, padding {total / p:.1f} tokens/s", flush=True)
    print(f"  engine KV cache:      {total / slot_s:8.1f} tokens/s  (best {slot_s:.2f} s)")
    print(f"  join-by-padding:      {total / pad_s:8.1f} tokens/s  (best {pad_s:.2f} s)")
    print(f"  engine / padding:     {pad_s / slot_s:8.2f}x")
    same = sum(slot_out[k] == pad_out[k] for k in slot_out)
    print(f"  identical greedy outputs: {same}/{len(slot_out)}")


if __name__ == "__main__":
    main()
