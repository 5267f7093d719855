"""What the Qwen-VL test-model builders share (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): Qwen's added tokens in
Qwen's id order, ``tokenizer_config.json`` as the Instruct checkpoints have it, and the build steps
(tokenizer, chat template, image processor config, seeded random weights, generation config)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from tritonvlm.testmodels.common import (
    SEED,
    added_tokens_decoder,
    log,
    save_greedy_model,
    train_bpe,
    write_json,
)

# (token, special). Qwen2-VL's added tokens (151643 ... 151656 there; right after the BPE vocab here).
QWEN2_VL_SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
]
# Qwen2.5-VL adds tool calls and fill-in-the-middle (up to 151664).
QWEN2_5_VL_SPECIAL_TOKENS: list[tuple[str, bool]] = QWEN2_VL_SPECIAL_TOKENS + [
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
# Qwen3(-VL) adds tool responses and thinking (up to 151668).
QWEN3_VL_SPECIAL_TOKENS: list[tuple[str, bool]] = QWEN2_5_VL_SPECIAL_TOKENS + [
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]


def token_ids(tok: Tokenizer, special_tokens: list[tuple[str, bool]]) -> dict[str, int]:
    """The id of each added token."""
    return {token: tok.token_to_id(token) for token, _ in special_tokens}


def tokenizer_config(
    tok: Tokenizer, special_tokens: list[tuple[str, bool]], model_max_length: int
) -> dict[str, Any]:
    """``tokenizer_config.json`` as the Qwen-VL Instruct checkpoints have it: eos ``<|im_end|>``, pad
    ``<|endoftext|>``, no BOS."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder(tok, special_tokens),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": [token for token, special in special_tokens if special][1:],
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen_into(
    tmp: Path,
    *,
    vocab_size: int,
    texts: list[str],
    special_tokens: list[tuple[str, bool]],
    model_max_length: int,
    chat_template: str,
    image_processor: Any,
    make_config: Callable[[dict[str, int]], Any],
    model_class: Any,
) -> int:
    """Write every file of a Qwen-VL test model into ``tmp``; returns the parameter count.

    ``make_config(ids)`` gets the added tokens' ids and returns the model's config."""
    t0 = time.perf_counter()
    tok = train_bpe(vocab_size, texts, special_tokens)
    tok.save(str(tmp / "tokenizer.json"))
    write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, special_tokens, model_max_length))
    (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    log(f"tokenizer: {tok.get_vocab_size()} tokens ({time.perf_counter() - t0:.1f}s)")
    write_json(tmp / "preprocessor_config.json", image_processor.to_dict())

    t1 = time.perf_counter()
    config = make_config(token_ids(tok, special_tokens))
    # Seeded random init on CPU, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(SEED)
        model = model_class(config).to(torch.float32).eval()
    eos = config.text_config.eos_token_id
    pad = config.text_config.pad_token_id
    return save_greedy_model(model, tmp, t1, config.text_config.bos_token_id, [eos, pad], pad)
