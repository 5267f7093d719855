"""What the engine counts, read by the Triton adapter for its metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Counters since start, read by the Triton adapter for its metrics."""

    num_running: int = 0
    num_waiting: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    max_decode_batch: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    kv_tokens_used: int = 0
    kv_bytes_used: int = 0  # keys/values the running sequences hold (their blocks; sliding layers: window)
    kv_bytes_capacity: int = 0  # what the KV cache reserves
    kv_blocks_used: int = 0  # KV blocks held by sequences or prefix-cache entries
    kv_blocks_free: int = 0
    preemptions: int = 0  # running sequences whose blocks were taken back (recomputed when resumed)
    kv_tokens_peak: int = 0  # the most tokens / bytes the running sequences held at once, since start
    kv_bytes_peak: int = 0
    extra_state_bytes: int = 0  # per-sequence state held besides keys/values (e.g. cross-attention states)
    prefix_cache_queries: int = 0  # prompts looked up in the prefix cache
    prefix_cache_hits: int = 0  # ... that started from a cached prefix
    prefix_cache_hit_tokens: int = 0  # prompt tokens copied from the cache instead of computed
    prefix_cache_entries: int = 0
    prefix_cache_tokens: int = 0  # tokens the cache's entries hold
    # Samples since the last read: the reader (metrics) drains them.
    ttft_seconds: list[float] = field(default_factory=list)
    step_intervals: list[float] = field(default_factory=list)
    queue_seconds: list[float] = field(default_factory=list)  # arrival in the engine -> prefill start
    prefill_step_seconds: list[float] = field(default_factory=list)  # one prefill forward + sampling
    decode_step_seconds: list[float] = field(default_factory=list)  # one decode forward + sampling
