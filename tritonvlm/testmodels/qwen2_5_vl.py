"""Random-weight Qwen2.5-VL checkpoints built offline, for tests and CPU benchmarks.

:func:`build_test_model` writes a directory laid out like a real Qwen2.5-VL checkpoint, which
``Qwen2_5_VLForConditionalGeneration.from_pretrained``, ``AutoTokenizer.from_pretrained`` and
the family's processor (:class:`tritonvlm.families.qwen2_5_vl.Qwen2_5_VLFamily`) load with no network:

- ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32, seeded random weights);
- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE (Qwen2's pre-tokenizer and
  normalizer) trained in-process on the corpus of :mod:`tritonvlm.testmodels.common`, followed by
  Qwen2.5-VL's special tokens in Qwen's order (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ... ``<|vision_start|>``, ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ...);
- ``chat_template.jinja``: Qwen2.5-VL's own chat template (default system prompt "You are a helpful
  assistant.", ``<|vision_start|><|image_pad|><|vision_end|>`` for each image part);
- ``preprocessor_config.json``: the Qwen2-VL image processor (patch 14, merge 2, temporal patch 2) with
  small pixel limits for CPU work: at least 56*56 = 3136 and at most 448*448 = 200704 pixels per image,
  i.e. 4 to 256 ``<|image_pad|>`` tokens per image.

The tokenizer has exactly ``vocab_size`` tokens (no unused embedding rows). Builds are deterministic:
the same size gives the same bytes in every file.

Sizes (parameters counted on the built model; float32 on disk):

- ``tiny`` (tests): text hidden 128, 2 layers, 4 heads (2 kv, head_dim 32, mrope_section [4, 6, 6]),
  MLP 256; vision hidden 64, depth 2, 4 heads, MLP 128, full attention in block 1; vocab 2,048;
  1.08M parameters, ~4.4 MB, builds in well under a second.
- ``medium`` (CPU benchmarks): text hidden 512, 8 layers, 8 heads (2 kv, head_dim 64, mrope_section
  [8, 12, 12]), MLP 1536; vision hidden 256, depth 4, 4 heads, MLP 1024, full attention in blocks 1
  and 3; vocab 32,768; 63.8M parameters (embeddings and LM head 33.6M, decoder layers 24.1M, vision
  6.1M), ~257 MB, builds in a few seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tritonvlm.testmodels.common import (
    CORPUS,
    build_sized,
    save_model,
    train_bpe,
    training_texts,
)
from tritonvlm.testmodels.qwen_common import (
    QWEN2_5_VL_SPECIAL_TOKENS,
    build_qwen_into,
    token_ids,
    tokenizer_config,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CORPUS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "SIZES",
    "SPECIAL_TOKENS",
    "ModelSize",
    "build_test_model",
    "build_tokenizer",
    "save_model",
]

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MODEL_MAX_LENGTH = 32768
MIN_PIXELS = 56 * 56  # 3136: at least 4x4 patches = 4 merged image tokens
MAX_PIXELS = 448 * 448  # 200704: at most 32x32 patches = 256 merged image tokens

# Qwen2.5-VL's added tokens, in Qwen's id order (151643 ... 151664 there; right after the BPE vocab here).
SPECIAL_TOKENS: list[tuple[str, bool]] = QWEN2_5_VL_SPECIAL_TOKENS

# Qwen2.5-VL-*-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    """The shape of one test model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_depth: int
    vision_num_heads: int
    fullatt_block_indexes: tuple[int, ...]
    pseudo_words: int  # pseudo-words added to the corpus so BPE can reach vocab_size

    @property
    def head_dim(self) -> int:
        """Per-head width of the text decoder."""
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """Temporal/height/width split of the rotary frequencies; sums to ``head_dim // 2``."""
        half = self.head_dim // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_depth=2,
        vision_num_heads=4,
        fullatt_block_indexes=(1,),
        pseudo_words=2_000,
    ),
    "medium": ModelSize(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vision_hidden_size=256,
        vision_intermediate_size=1024,
        vision_depth=4,
        vision_num_heads=4,
        fullatt_block_indexes=(1, 3),
        pseudo_words=60_000,
    ),
}


def _training_texts(size: ModelSize) -> list[str]:
    """The lines the BPE is trained on: the corpus, then pseudo-words up to the vocabulary size."""
    return training_texts(size.pseudo_words)


def build_tokenizer(vocab_size: int, texts: list[str]) -> Tokenizer:
    """A Qwen2-style byte-level BPE with exactly ``vocab_size`` tokens, the last ones Qwen's added tokens."""
    return train_bpe(vocab_size, texts, SPECIAL_TOKENS)


def _tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json`` as Qwen2.5-VL-Instruct has it: eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    return tokenizer_config(tok, SPECIAL_TOKENS, MODEL_MAX_LENGTH)


def _model_config(size: ModelSize, tok_or_ids: Tokenizer | dict[str, int]) -> Qwen2_5_VLConfig:
    ids = tok_or_ids if isinstance(tok_or_ids, dict) else token_ids(tok_or_ids, SPECIAL_TOKENS)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text_config = {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "max_window_layers": size.num_hidden_layers,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": size.mrope_section,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": eos[0],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": size.vision_depth,
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_heads": size.vision_num_heads,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": size.hidden_size,
        "fullatt_block_indexes": list(size.fullatt_block_indexes),
    }
    return Qwen2_5_VLConfig(
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
    """Write every file of the model into ``tmp``; returns the parameter count."""
    return build_qwen_into(
        tmp,
        vocab_size=size.vocab_size,
        texts=_training_texts(size),
        special_tokens=SPECIAL_TOKENS,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        image_processor=Qwen2VLImageProcessorPil(
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
            patch_size=PATCH_SIZE,
            merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
        ),
        make_config=lambda ids: _model_config(size, ids),
        model_class=Qwen2_5_VLForConditionalGeneration,
    )


def build_test_model(out_dir: str | os.PathLike[str], size: str = "tiny") -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint of ``size`` (``tiny`` or ``medium``) to ``out_dir``.

    Works offline and is deterministic (same size, same bytes); see
    :func:`tritonvlm.testmodels.common.write_model_dir`. Returns the directory.
    """
    return build_sized(out_dir, size, SIZES, "Qwen2.5-VL", _build_into)
