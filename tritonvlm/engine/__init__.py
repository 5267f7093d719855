"""The in-flight batching decoder engine (importable and testable without Triton).

Split the way nano-vllm splits it: ``engine_config`` (the settings, and the KV budget in slots and
blocks), ``engine_stats``, ``sequence`` (a request's state), ``scheduler`` (waiting/running),
``kv_cache`` (KV memory in blocks), ``block_manager`` (block reference counts), ``kv_admission`` (who
holds blocks: admission, growth, preemption), ``prefix_cache``, ``model_runner`` (tensors in, logits
out), ``sampler`` (and ``device_sampling``, its choices left on the device), ``detokenizer``,
``overlap`` (what async output and scheduling leave outstanding) and ``llm_engine`` (the loop). On
CUDA, Triton kernels (``triton_kernels``, loaded by ``triton_runtime``) do the decode attention over
the KV blocks (``paged_attention``), the RMSNorm layers (``fused_norm``) and the rotary embeddings
(``fused_rotary``).
"""

from __future__ import annotations

from typing import Any

# Resolved lazily so that torch-free modules (sampling_params) import without pulling in torch.
_EXPORTS = {
    "EngineConfig": "tritonvlm.engine.engine_config",
    "EngineStats": "tritonvlm.engine.engine_stats",
    "LLMEngine": "tritonvlm.engine.llm_engine",
    "EngineOutput": "tritonvlm.engine.sequence",
    "SamplingParams": "tritonvlm.engine.sampling_params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
