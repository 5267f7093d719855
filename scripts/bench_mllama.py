#!/usr/bin/env python
"""Llama 3.2 Vision in the engine: memory and step times, for the real 11B's shape (random weights built
on the device: no checkpoint needed) or the medium test model's.

Prints the self-attention KV bytes per token, the cross-attention state per sequence (the image's
keys/values in the cross layers, held in the slot KV cache), the vision tower's time for one image, a
prefill, and decode step times for batches of text-only rows, image rows and both mixed (the runner
alone: tensors in, logits out).

    python scripts/bench_mllama.py --shape 11b            # on a GPU (bf16)
    python scripts/bench_mllama.py --shape medium --batches 1 4
    python scripts/bench_mllama.py --admission MODEL_DIR --budget-tokens 2048   # the engine, any device

``--admission`` runs the whole engine on a model directory instead (e.g. the medium test model,
``tritonvlm build-test-model DIR --family mllama --size medium``): 12 image requests at once, each
asking for ``max_tokens`` 512 and answered in 32 to 104 tokens (cancelled there: a stand-in for an
end of sequence the random model does not give), in a KV pool of ``--budget-tokens`` tokens of blocks
besides every slot's cross states. Prints the wall time, the most requests running at once and the
preemptions: what admitting by the prompt's blocks (rather than prompt + max_tokens) buys.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration

from tritonvlm.engine.detokenizer import IncrementalDetokenizer
from tritonvlm.engine.kv_cache import PagedKVCache
from tritonvlm.engine.model_runner import ModelRunner
from tritonvlm.engine.sampling_params import SamplingParams
from tritonvlm.engine.sequence import Sequence
from tritonvlm.families.mllama import MASK, STATES, MllamaFamily
from tritonvlm.testmodels.mllama import SIZES

# Llama-3.2-11B-Vision(-Instruct)'s config.json, less what does not change shapes.
SHAPE_11B = {
    "text_config": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    },
    "vision_config": {"image_size": 560},
}


def config_for(shape: str) -> MllamaConfig:
    if shape == "11b":
        return MllamaConfig(**SHAPE_11B)
    size = SIZES[shape]
    return MllamaConfig(
        text_config={
            "vocab_size": size.vocab_size,
            "hidden_size": size.hidden_size,
            "intermediate_size": size.intermediate_size,
            "num_hidden_layers": size.num_hidden_layers,
            "cross_attention_layers": list(size.cross_attention_layers),
            "num_attention_heads": size.num_attention_heads,
            "num_key_value_heads": size.num_key_value_heads,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
        },
        vision_config={
            "hidden_size": size.vision_hidden_size,
            "intermediate_size": size.vision_intermediate_size,
            "num_hidden_layers": size.vision_layers,
            "num_global_layers": size.vision_global_layers,
            "attention_heads": size.vision_heads,
            "image_size": size.tile_size,
            "intermediate_layers_indices": list(size.intermediate_layers_indices),
            "vision_output_dim": size.vision_output_dim,
        },
        image_token_index=size.vocab_size,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_seq(i: int, family: MllamaFamily, image: bool, prompt_len: int, states: torch.Tensor) -> Sequence:
    """A prompt of ``prompt_len`` ids; with an image, ``<|image|>`` at position 5 and its states."""
    ids = [100 + (i + j) % 1000 for j in range(prompt_len)]
    mm: dict[str, torch.Tensor] = {}
    if image:
        ids[5] = family.image_token_id
        mask = torch.zeros(prompt_len, 1, family.num_tiles, dtype=torch.long)
        mask[5:, 0, :2] = 1  # a 2-tile image
        mm = {STATES: states, MASK: mask}
    params = SamplingParams(max_tokens=10_000, temperature=0)
    return Sequence(str(i), ids, params, lambda o: None, IncrementalDetokenizer(None, []), mm)


@torch.inference_mode()
def admission(model_dir: str, budget_tokens: int, requests: int = 12) -> None:
    """The engine on ``model_dir``: ``requests`` image requests at once (see the module docstring)."""
    import io

    import numpy as np
    from PIL import Image

    from tritonvlm.engine import EngineConfig, LLMEngine
    from tritonvlm.preprocessing import ChatPreprocessor

    torch.set_num_threads(2)
    pre = ChatPreprocessor.from_pretrained(model_dir)
    family = pre.family
    model = family.load_model(model_dir)
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(requests):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96 + 8 * i, 128, 3), dtype=np.uint8)).save(png, "PNG")
        content = [{"type": "image"}, {"type": "text", "text": f"Describe picture {i}."}]
        prompt = pre([{"role": "user", "content": content}], [png.getvalue()])
        mm = family.encode(model, [{k: torch.from_numpy(np.asarray(v)) for k, v in prompt.mm.items()}])[0]
        inputs.append((prompt.input_ids.tolist(), mm, 32 + 24 * (i % 4)))
    family.strip_for_decoder(model)
    dtype = next(model.parameters()).dtype
    kinds, (heads, dim) = family.layer_kinds(), family.kv_geometry()
    max_len = 1024
    per_slot = PagedKVCache.slot_bytes(kinds, heads, dim, max_len, dtype) + family.extra_state_bytes(dtype)
    blocks = budget_tokens // 16 + 1  # (+ the pool's scratch block)
    budget = requests * per_slot + blocks * PagedKVCache.bytes_per_block(kinds, heads, dim, dtype)
    config = EngineConfig(
        max_num_seqs=requests, max_model_len=max_len, kv_cache_memory=str(budget), prefix_cache_slots=0
    )
    engine = LLMEngine(model, pre.processor.tokenizer, config, family)
    done: set[str] = set()
    params = SamplingParams(max_tokens=512, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    for i, (ids, mm, _) in enumerate(inputs):
        engine.add_request(str(i), ids, params, lambda out: out.finished and done.add(out.request_id), mm)
    peak = 0
    while len(done) < requests:
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
        for seq in engine.scheduler.running:
            if len(seq.output_ids) >= inputs[int(seq.request_id)][2] and not seq.cancel_requested:
                engine.cancel(seq.request_id)
    print(
        f"{requests} image requests (max_tokens 512, answers of 32-104 tokens), {budget_tokens} tokens of "
        f"KV blocks: {time.perf_counter() - started:.1f} s, at most {peak} running at once, "
        f"{engine.stats.preemptions} preemptions"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["11b", "medium", "tiny"], default="11b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--admission", metavar="MODEL_DIR", help="the engine on a model directory instead")
    parser.add_argument("--budget-tokens", type=int, default=2048, help="--admission: KV blocks, in tokens")
    args = parser.parse_args()
    if args.admission:
        admission(args.admission, args.budget_tokens)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = config_for(args.shape)
    t0 = time.perf_counter()
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    family = MllamaFamily(config)
    print(f"{args.shape} shape on {device} ({dtype}): built in {time.perf_counter() - t0:.1f}s")

    kv_heads, head_dim = family.kv_geometry()
    self_layers = config.text_config.num_hidden_layers - len(family.cross_layers)
    per_token = PagedKVCache.bytes_per_token(self_layers, kv_heads, head_dim, dtype)
    per_state = PagedKVCache.bytes_per_token(len(family.cross_layers), kv_heads, head_dim, dtype)
    cross = family.states_per_image * per_state
    print(
        f"self-attention KV: {per_token} bytes/token ({self_layers} layers, {kv_heads} kv heads x {head_dim})"
    )
    print(
        f"cross-attention state: {family.states_per_image} states/image x {len(family.cross_layers)} layers "
        f"= {cross} bytes/sequence ({cross / 2**20:.1f} MiB, as much as {cross / per_token:.0f} tokens of KV)"
    )

    # The vision tower + projector for one image of 4 tiles.
    size = config.vision_config.image_size
    pixels = torch.randn(1, 1, family.num_tiles, 3, size, size)
    batch = [{
        "pixel_values": pixels,
        "aspect_ratio_ids": torch.tensor([[6]]),  # 2x2 tiles
        "aspect_ratio_mask": torch.ones(1, 1, family.num_tiles, dtype=torch.long),
        MASK: torch.ones(8, 1, family.num_tiles, dtype=torch.long),
    }]  # fmt: skip
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        states = family.encode(model, batch)[0][STATES]
        sync(device)
        encode_ms = (time.perf_counter() - t) * 1000
    print(f"vision tower + projector, one 4-tile image: {encode_ms:.1f} ms -> states {tuple(states.shape)}")
    states = states.to(dtype)

    family.strip_for_decoder(model)
    for batch_size in args.batches:
        runner = ModelRunner(model, family, batch_size, args.max_len)
        for mix in ("text", "mixed", "image"):
            images = {"text": 0, "mixed": batch_size // 2 or 1, "image": batch_size}[mix]
            if mix == "mixed" and batch_size == 1:
                continue
            seqs = [make_seq(i, family, i < images, args.prompt_len, states) for i in range(batch_size)]
            for slot in range(batch_size):  # the blocks for the prompt and every decode step
                runner.cache.release(slot)
                runner.cache.grow(slot, args.prompt_len + args.steps + 1)
            sync(device)
            t = time.perf_counter()
            logits = runner.prefill(seqs, 0)
            sync(device)
            prefill_ms = (time.perf_counter() - t) * 1000
            for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                seq.output_ids.append(token)
            times = []
            for _ in range(args.steps):
                sync(device)
                t = time.perf_counter()
                logits = runner.decode(seqs)
                tokens = logits.argmax(-1).tolist()
                sync(device)
                times.append(time.perf_counter() - t)
                for seq, token in zip(seqs, tokens, strict=True):
                    seq.output_ids.append(token)
            step = sorted(times[2:])[len(times[2:]) // 2] * 1000
            held = runner.cache.state_bytes_held(batch_size)
            print(
                f"batch {batch_size:3d} {mix:6s} ({images:3d} images): prefill {prefill_ms:7.1f} ms, "
                f"decode {step:6.2f} ms/step ({batch_size / step * 1000:7.0f} tok/s), "
                f"cross state held {held / 2**20:8.1f} MiB"
            )
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
