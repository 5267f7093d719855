"""Random-weight LLaVA-OneVision checkpoints built offline, for tests and CPU benchmarks.

:func:`build_test_model` writes a directory laid out like ``llava-hf/llava-onevision-qwen2-*-ov-hf``,
which ``LlavaOnevisionForConditionalGeneration.from_pretrained``, ``AutoTokenizer.from_pretrained`` and
the family's processor (:class:`tritonvlm.families.llava_onevision.LlavaOnevisionFamily`) load with no
network:

- ``config.json`` (``llava_onevision``: a SigLIP vision tower, a two-layer projector, the
  ``image_newline`` vector and a Qwen2 text model), ``generation_config.json``, ``model.safetensors``
  (float32, seeded random weights);
- ``tokenizer.json`` / ``tokenizer_config.json``: a Qwen2-style byte-level BPE trained in-process,
  followed by the checkpoint's added tokens in its order (``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ``<image>``, ``<video>``);
- ``chat_template.jinja``: the checkpoint's template (no default system prompt; each message renders
  its images first, one ``<image>\\n`` each, then its text parts);
- ``preprocessor_config.json``: the anyres image processor (SigLIP's 0.5 mean/std) with a small tile
  and a small grid of tile layouts, ``processor_config.json``: tokens per tile and the anyres limit.

Anyres, scaled down: a tile is ``TILE`` pixels square (384 in the real model) and its SigLIP patches are
``PATCH`` pixels (14), so one tile gives ``(TILE / PATCH)**2`` features (729). An image alone in its
prompt is seen whole (the base tile) plus as a grid of up to 3x3 tiles (6x6 in the real model) chosen
by ``select_best_resolution``; its features are un-padded to the image's aspect ratio, given one
``image_newline`` per row and, past ``anyres_max_4`` tiles' worth (``anyres_max_9`` in the real model),
interpolated down. An image that shares its prompt with others is only the base tile padded to a
square, plus one newline. The token count therefore depends on the image size and on the number of
images in the prompt; the limit is scaled so that both the plain and the interpolated paths occur.

Sizes (parameters counted on the built model; float32 on disk):

- ``tiny`` (tests): text hidden 128, 2 layers, 4 heads (2 kv, head_dim 32), MLP 256; SigLIP hidden
  64, 2 layers, 4 heads, MLP 128, tile 32 px, patch 8 px (16 features per tile, so 16 to ~100 image
  tokens for an image alone in its prompt, 17 for each of several); vocab 2,048; 0.93M parameters,
  ~3.8 MB, builds in well under a second.
- ``medium`` (CPU benchmarks): text hidden 512, 8 layers, 8 heads (2 kv, head_dim 64), MLP 1536;
  SigLIP hidden 256, 4 layers, 4 heads, MLP 1024, tile 112 px, patch 14 px (64 features per tile);
  vocab 32,768; 61.4M parameters (vision 3.3M), ~248 MB, builds in about a minute.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from tritonvlm.testmodels.common import (
    SEED,
    added_tokens_decoder,
    build_sized,
    log,
    save_greedy_model,
    train_bpe,
    training_texts,
    write_json,
)

__all__ = ["CHAT_TEMPLATE", "SIZES", "SPECIAL_TOKENS", "ModelSize", "build_test_model", "grid_pinpoints"]

# The checkpoint's added tokens, in its id order (151643 ... 151647 there; right after the BPE vocab here).
# (token, special)
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<image>", True),
    ("<video>", True),
]

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat template, verbatim (as transformers' conversion script
# writes it). Message contents must be lists of parts: the template renders nothing of a plain string.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MAX_TILES_PER_SIDE = 3  # the real checkpoint: 6 (384 ... 2304 pixels per side)
VISION_ASPECT_RATIO = "anyres_max_4"  # the real checkpoint: anyres_max_9 (of 36 possible tiles)


def grid_pinpoints(tile: int, max_per_side: int = MAX_TILES_PER_SIDE) -> list[list[int]]:
    """The anyres tile layouts ``[height, width]``: every grid of 1 .. ``max_per_side`` tiles per side."""
    sides = [tile * n for n in range(1, max_per_side + 1)]
    return [[h, w] for h in sides for w in sides]


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
    vision_layers: int
    vision_num_heads: int
    tile: int  # pixels per side of one tile (SigLIP's image_size)
    patch: int  # pixels per side of one SigLIP patch
    pseudo_words: int  # pseudo-words added to the corpus so BPE can reach vocab_size

    @property
    def tokens_per_tile(self) -> int:
        """Features one tile gives (``num_image_tokens`` of the processor)."""
        return (self.tile // self.patch) ** 2


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
        vision_layers=2,
        vision_num_heads=4,
        tile=32,
        patch=8,
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
        vision_layers=4,
        vision_num_heads=4,
        tile=112,
        patch=14,
        pseudo_words=60_000,
    ),
}


def build_tokenizer(size: ModelSize) -> Tokenizer:
    """A Qwen2-style byte-level BPE with exactly ``vocab_size`` tokens, the last ones the added tokens."""
    return train_bpe(size.vocab_size, training_texts(size.pseudo_words), SPECIAL_TOKENS)


def _tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json`` as the checkpoint has it: Qwen2's (eos ``<|im_end|>``, pad
    ``<|endoftext|>``, no BOS), ``<image>`` and ``<video>`` added as special tokens."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder(tok, SPECIAL_TOKENS),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "LlavaOnevisionProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _image_processor(size: ModelSize) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": size.tile, "width": size.tile},
        image_grid_pinpoints=grid_pinpoints(size.tile),
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _preprocessor_config(size: ModelSize) -> dict[str, Any]:
    """``preprocessor_config.json``: named like the checkpoint's (``LlavaOnevisionImageProcessor``; the
    family loads the PIL backend of it without torchvision)."""
    data = _image_processor(size).to_dict()
    data["image_processor_type"] = "LlavaOnevisionImageProcessor"
    data["processor_class"] = "LlavaOnevisionProcessor"
    return data


def _processor_config(size: ModelSize) -> dict[str, Any]:
    return {
        "image_token": "<image>",
        "num_image_tokens": size.tokens_per_tile,
        "processor_class": "LlavaOnevisionProcessor",
        "video_token": "<video>",
        "vision_aspect_ratio": VISION_ASPECT_RATIO,
        "vision_feature_select_strategy": "full",
    }


def _model_config(size: ModelSize, tok: Tokenizer) -> LlavaOnevisionConfig:
    ids = {token: tok.token_to_id(token) for token, _ in SPECIAL_TOKENS}
    text_config = {
        "model_type": "qwen2",
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
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_num_heads,
        "image_size": size.tile,
        "patch_size": size.patch,
        "vision_use_head": False,
    }
    return LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        image_grid_pinpoints=grid_pinpoints(size.tile),
        tie_word_embeddings=False,
        dtype="float32",
    )


def _build_into(tmp: Path, size: ModelSize) -> int:
    """Write every file of the model into ``tmp``; returns the parameter count."""
    t0 = time.perf_counter()
    tok = build_tokenizer(size)
    tok.save(str(tmp / "tokenizer.json"))
    write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok))
    (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    write_json(tmp / "preprocessor_config.json", _preprocessor_config(size))
    write_json(tmp / "processor_config.json", _processor_config(size))
    log(f"tokenizer: {tok.get_vocab_size()} tokens ({time.perf_counter() - t0:.1f}s)")

    t1 = time.perf_counter()
    config = _model_config(size, tok)
    # Seeded random init on CPU, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(SEED)
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32).eval()
    eos = config.text_config.eos_token_id
    pad = config.text_config.pad_token_id
    return save_greedy_model(model, tmp, t1, config.text_config.bos_token_id, [eos, pad], pad)


def build_test_model(out_dir: str | os.PathLike[str], size: str = "tiny") -> Path:
    """Write a random-weight LLaVA-OneVision checkpoint of ``size`` (``tiny`` or ``medium``) to ``out_dir``.

    Works offline and is deterministic (same size, same bytes); see
    :func:`tritonvlm.testmodels.common.write_model_dir`. Returns the directory.
    """
    return build_sized(out_dir, size, SIZES, "LLaVA-OneVision", _build_into)
