"""The engine's settings and what they come to on a device: defaults by device type, the parameters of
a Triton model parsed, and the KV memory budget turned into sequence slots and KV blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonvlm.engine.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from tritonvlm.families import Family


@dataclass
class EngineConfig:
    """Engine limits. ``max_model_len``: the most tokens (prompt + max_tokens) one sequence may hold."""

    max_num_seqs: int = 16
    max_model_len: int = 4096
    max_prefill_tokens: int = 8192
    # While other sequences are decoding, a step prefills at most this many prompt tokens (a longer
    # prompt is prefilled in chunks, one per step, between their decode steps); 0: no limit. Alone, a
    # prompt is prefilled in one pass. A family that cannot take chunks prefills whole prompts
    # (Family.supports_chunked_prefill: every family served here can).
    prefill_chunk_tokens: int = 512
    # KV memory budget: "" makes room for max_num_seqs (+ CACHE_ROOM_SEQUENCES, with the prefix
    # cache on) sequences of max_model_len tokens; a size ("4GiB", "512MB") or a fraction of the
    # device's free memory at start-up ("0.5") is what the KV blocks (and the per-sequence rows of
    # sliding/cross layers) get. Sequences hold blocks as they grow. A sequence is admitted when its
    # prompt's blocks are free (with a 1% margin); a running sequence that finds no free block takes
    # the last admitted one's, which is recomputed when it comes back (preemption).
    kv_cache_memory: str = ""
    # Prompts (from their prefill on) and finished sequences whose keys/values (their KV blocks) are
    # kept for later prompts with the same start, at most this many; they give their blocks back when
    # a new sequence needs them (so their number is in practice bounded by the free KV memory). 0 turns
    # the prefix cache off.
    prefix_cache_slots: int = 256
    # On CUDA, replay decode steps from CUDA graphs (captured per batch/length bucket on first use).
    cuda_graphs: bool = True
    # Decode attention over the KV blocks: "triton" (a kernel reading each sequence's own blocks),
    # "gather" (blocks copied into one padded tensor for SDPA), "auto" (triton on CUDA if it works).
    decode_attention: str = "auto"
    # The language model's RMSNorm layers and rotary embeddings as one Triton kernel each: "true",
    # "false", "auto" (CUDA).
    fused_ops: str = "auto"
    # Turn a decode step's tokens into text and send them while the next step runs on the device
    # (the next step is launched first): "true", "false", "auto" (CUDA, where the device computes
    # while the host works; on a CPU the host computes the step itself and outputs would only wait).
    async_output: str = "auto"
    # Launch the next decode step before the last one's tokens are read back, feeding it those tokens
    # on the device, and record them (and make their text) while it runs: "true" (async output on
    # too), "false", "auto" (CUDA, unless async output is off). Steps with a row whose choice needs
    # the host (a grammar) or that may preempt run as without.
    async_scheduling: str = "auto"


# Defaults where none is given, by device type: a GPU fills a share of its free memory with sequences.
AUTO_MAX_NUM_SEQS = {"cuda": 256, "cpu": 16}
AUTO_KV_CACHE_MEMORY = {"cuda": "0.6", "cpu": ""}
AUTO_PREFILL_CHUNK = {"cuda": 2048, "cpu": 512}
AUTO_PREFIX_CACHE_SLOTS = {"cuda": 1024, "cpu": 256}
# Without a KV budget, the pool also has room for this many full-length sequences for the prefix cache.
CACHE_ROOM_SEQUENCES = 4


def engine_config(params: dict[str, str], device_type: str) -> EngineConfig:
    """The engine settings of a model's parameters (strings, empty for "not given"); unset ones take
    the device's defaults: on CUDA up to 256 sequences within 60% of the free memory after the
    weights, on CPU 16 sequences with room for a full-length one each."""
    return EngineConfig(
        max_num_seqs=int(params.get("max_num_seqs") or AUTO_MAX_NUM_SEQS.get(device_type, 16)),
        max_model_len=int(params.get("max_model_len") or EngineConfig.max_model_len),
        max_prefill_tokens=int(params.get("max_prefill_tokens") or EngineConfig.max_prefill_tokens),
        prefill_chunk_tokens=int(
            params.get("prefill_chunk_tokens")
            or AUTO_PREFILL_CHUNK.get(device_type, EngineConfig.prefill_chunk_tokens)
        ),
        kv_cache_memory=params.get("kv_cache_memory") or AUTO_KV_CACHE_MEMORY.get(device_type, ""),
        prefix_cache_slots=int(
            params.get("prefix_cache_slots")
            or AUTO_PREFIX_CACHE_SLOTS.get(device_type, EngineConfig.prefix_cache_slots)
        ),
        cuda_graphs=(params.get("cuda_graphs") or "true").strip().lower() not in ("false", "0", "off"),
        decode_attention=(params.get("decode_attention") or "auto").strip().lower(),
        fused_ops=(params.get("fused_ops") or "auto").strip().lower(),
        async_output=(params.get("async_output") or "auto").strip().lower(),
        async_scheduling=(params.get("async_scheduling") or "auto").strip().lower(),
    )


def parse_memory(value: str, free_bytes: int) -> int | None:
    """``""`` → None; ``"0.5"`` → half of ``free_bytes``; ``"4GiB"``, ``"512MB"``, ``"1e9"`` → bytes."""
    value = value.strip()
    if not value:
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lower = value.lower()
    for suffix, scale in units.items():
        if lower.endswith(suffix):
            return int(float(lower[: -len(suffix)]) * scale)
    number = float(lower)
    return int(number * free_bytes) if number <= 1.0 else int(number)


def free_memory(device: torch.device) -> int:
    """Free memory on the device now (CUDA: free GPU memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def kv_slots(model: torch.nn.Module, family: Family, config: EngineConfig) -> int:
    """How many sequences may run at once: ``max_num_seqs``, capped by the memory budget where each
    slot's fixed rows (sliding windows, cross-attention states, the family's state) need it."""
    return kv_layout(model, family, config)[0]


def kv_layout(model: torch.nn.Module, family: Family, config: EngineConfig) -> tuple[int, int]:
    """``(sequence slots, KV blocks)`` for the memory budget. Without one: ``max_num_seqs`` slots and
    blocks for ``max_num_seqs`` (+ :data:`CACHE_ROOM_SEQUENCES` with the prefix cache on) sequences of
    ``max_model_len`` tokens. With one: the slots' fixed rows first, the rest in blocks, at least one
    max-length sequence's worth."""
    param = next(model.parameters())
    kinds = family.layer_kinds()
    heads, head_dim = family.kv_geometry()
    per_block = PagedKVCache.bytes_per_block(kinds, heads, head_dim, param.dtype)
    per_slot = PagedKVCache.slot_bytes(kinds, heads, head_dim, config.max_model_len, param.dtype)
    per_slot += family.extra_state_bytes(param.dtype)
    one_sequence = -(-config.max_model_len // DEFAULT_BLOCK_SIZE)
    room = min(CACHE_ROOM_SEQUENCES, max(0, config.prefix_cache_slots)) if family.supports_prefix_cache else 0
    budget = parse_memory(config.kv_cache_memory, free_memory(param.device))
    if budget is None:
        return config.max_num_seqs, (config.max_num_seqs + room) * one_sequence
    slots = config.max_num_seqs
    if per_slot:
        slots = min(slots, (budget - (one_sequence + 1) * per_block) // per_slot)
    # (+1 and -1: the pool's scratch block)
    blocks = (budget - max(slots, 0) * per_slot) // per_block - 1 if per_block else one_sequence
    if slots < 1 or blocks < one_sequence:
        raise ValueError(
            f"kv_cache_memory={config.kv_cache_memory!r} ({budget} bytes) cannot hold one sequence of "
            f"max_model_len={config.max_model_len} tokens "
            f"({sequence_bytes(family, config.max_model_len, param.dtype)} bytes)"
        )
    return slots, blocks


def sequence_bytes(family: Family, max_len: int, dtype: torch.dtype) -> int:
    """Memory one sequence of ``max_len`` tokens holds: its keys/values across all layers (cross
    layers' encoder states included) and the family's extra state."""
    kv_heads, head_dim = family.kv_geometry()
    kv = PagedKVCache.bytes_per_sequence(family.layer_kinds(), kv_heads, head_dim, max_len, dtype)
    return kv + family.extra_state_bytes(dtype)


ASYNC_OUTPUT = ("auto", "true", "false")


def async_output_wanted(setting: str, device: torch.device, name: str = "async_output") -> bool:
    """``EngineConfig.async_output`` (or another auto/true/false setting ``name``) on ``device``:
    "auto" is on for CUDA only."""
    if setting not in ASYNC_OUTPUT:
        raise ValueError(f"{name}={setting!r}: expected one of {', '.join(ASYNC_OUTPUT)}")
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def async_scheduling_wanted(config: EngineConfig, device: torch.device) -> bool:
    """``EngineConfig.async_scheduling`` on ``device``: "auto" is on for CUDA unless async output is
    off; "true" turns async output on too (the tokens' text is made while the next step runs), and
    contradicts ``async_output="false"``."""
    wanted = async_output_wanted(config.async_scheduling, device, "async_scheduling")
    if config.async_scheduling == "true":
        if config.async_output == "false":
            raise ValueError("async_scheduling='true' needs async output: set async_output to auto or true")
        return True
    return wanted and async_output_wanted(config.async_output, device)
