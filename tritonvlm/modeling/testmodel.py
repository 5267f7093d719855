"""Kept for older imports: the Qwen2.5-VL test model builder now lives in
:mod:`tritonvlm.testmodels.qwen2_5_vl` (every family has its own builder there)."""

from tritonvlm.testmodels.common import save_model
from tritonvlm.testmodels.qwen2_5_vl import (  # noqa: F401 (re-exported)
    CHAT_TEMPLATE,
    CORPUS,
    MAX_PIXELS,
    MIN_PIXELS,
    SIZES,
    SPECIAL_TOKENS,
    ModelSize,
    _model_config,
    _tokenizer_config,
    _training_texts,
    build_test_model,
    build_tokenizer,
)

__all__ = ["build_test_model", "save_model"]
