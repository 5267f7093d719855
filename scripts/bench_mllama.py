#!/usr/bin/env python
"""Llama 3.2 Vision in the engine: memory and step times, for the real 11B's shape (random weights built
on the device: no checkpoint needed) or the medium test model's.

Prints the self-attention KV bytes per token, the cross-attention state per sequence (the image's
keys/values in the cross layers, held in the slot KV cache), the vision tower's time for one image, a
prefill, and decode step times for batches of text-only rows, image rows and both mixed (the runner
alone: tensors in, logits out).

    python scripts/bench_mllama.py --shape 11b            # on a GPU (bf16)
    python scripts/bench_mllama.py --shape medium --batches 1 4
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
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["11b", "medium", "tiny"], default="11b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    args = parser.parse_args()

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
