"""The in-flight batching decoder engine (importable and testable without Triton).

Split the way nano-vllm splits it: ``sequence`` (a request's state), ``scheduler`` (waiting/running,
admission), ``kv_cache`` (slot KV memory), ``model_runner`` (tensors in, logits out), ``sampler``,
``detokenizer`` and ``llm_engine`` (the loop).
"""

from tritonvlm.engine.llm_engine import EngineConfig, EngineStats, LLMEngine
from tritonvlm.engine.sampling_params import SamplingParams
from tritonvlm.engine.sequence import EngineOutput

__all__ = ["EngineConfig", "EngineOutput", "EngineStats", "LLMEngine", "SamplingParams"]
