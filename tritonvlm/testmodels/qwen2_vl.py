"""Random-weight Qwen2-VL checkpoints built offline, for tests and CPU benchmarks.

:func:`build_test_model` writes a directory laid out like ``Qwen/Qwen2-VL-7B-Instruct``, which
``Qwen2VLForConditionalGeneration.from_pretrained``, ``AutoTokenizer.from_pretrained`` and the
family's processor (:class:`tritonvlm.families.qwen2_vl.Qwen2VLFamily`) load with no network:

- ``config.json`` (``model_type`` ``qwen2_vl``), ``generation_config.json``, ``model.safetensors``
  (float32, seeded random weights);
- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE trained in-process, followed by
  Qwen2-VL's 14 added tokens in Qwen's order (``<|endoftext|>`` ... ``<|image_pad|>``,
  ``<|video_pad|>``: Qwen2-VL has no tool-call or fill-in-the-middle tokens);
- ``chat_template.jinja``: Qwen2-VL-Instruct's chat template (the same text as Qwen2.5-VL's: default
  system prompt "You are a helpful assistant.", ``<|vision_start|><|image_pad|><|vision_end|>`` per image);
- ``preprocessor_config.json``: the Qwen2-VL image processor (patch 14, merge 2, temporal patch 2,
  CLIP mean/std) with small pixel limits: 56*56 to 448*448 pixels, i.e. 4 to 256 image tokens.

The vision tower is Qwen2-VL's: LayerNorm + QuickGELU blocks, full attention everywhere (no windows),
``embed_dim`` wide, merged to the text width. Builds are deterministic.

Sizes (the text decoder and vocabulary as in :mod:`tritonvlm.testmodels.qwen2_5_vl`):

- ``tiny`` (tests): text hidden 128, 2 layers, 4 heads (2 kv, head_dim 32, mrope_section [4, 6, 6]),
  MLP 256; vision embed 64, depth 2, 4 heads, MLP ratio 2; vocab 2,048; 1.06M parameters, ~4.4 MB,
  builds in about a second.
- ``medium`` (CPU benchmarks): text hidden 512, 8 layers, 8 heads (2 kv, head_dim 64), MLP 1536;
  vision embed 256, depth 4, 4 heads, MLP ratio 4; vocab 32,768; 62.7M parameters (vision 5.0M), ~253 MB.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tritonvlm.testmodels.common import build_sized, training_texts
from tritonvlm.testmodels.qwen2_5_vl import (
    CHAT_TEMPLATE,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    SIZES,
    TEMPORAL_PATCH_SIZE,
    ModelSize,
)
from tritonvlm.testmodels.qwen_common import QWEN2_VL_SPECIAL_TOKENS, build_qwen_into

__all__ = ["CHAT_TEMPLATE", "SIZES", "SPECIAL_TOKENS", "build_test_model"]

SPECIAL_TOKENS = QWEN2_VL_SPECIAL_TOKENS
MODEL_MAX_LENGTH = 32768
# Qwen2-VL's image normalisation (OpenAI CLIP's), as in its preprocessor_config.json.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _model_config(size: ModelSize, ids: dict[str, int]) -> Qwen2VLConfig:
    text_config = {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "max_window_layers": size.num_hidden_layers,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": size.mrope_section,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": size.vision_depth,
        "embed_dim": size.vision_hidden_size,
        "hidden_size": size.hidden_size,  # the merger's output: the text width
        "hidden_act": "quick_gelu",
        "mlp_ratio": size.vision_intermediate_size // size.vision_hidden_size,
        "num_heads": size.vision_num_heads,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def _build_into(tmp: Path, size: ModelSize) -> int:
    return build_qwen_into(
        tmp,
        vocab_size=size.vocab_size,
        texts=training_texts(size.pseudo_words),
        special_tokens=SPECIAL_TOKENS,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        image_processor=Qwen2VLImageProcessorPil(
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
            patch_size=PATCH_SIZE,
            merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            image_mean=IMAGE_MEAN,
            image_std=IMAGE_STD,
        ),
        make_config=lambda ids: _model_config(size, ids),
        model_class=Qwen2VLForConditionalGeneration,
    )


def build_test_model(out_dir: str | os.PathLike[str], size: str = "tiny") -> Path:
    """Write a random-weight Qwen2-VL checkpoint of ``size`` (``tiny`` or ``medium``) to ``out_dir``
    (offline, deterministic; see :func:`tritonvlm.testmodels.common.write_model_dir`)."""
    return build_sized(out_dir, size, SIZES, "Qwen2-VL", _build_into)
