"""Random-weight Gemma 3 checkpoints built offline, for tests and CPU benchmarks.

:func:`build_test_model` writes a directory laid out like ``google/gemma-3-4b-it``, which
``Gemma3ForConditionalGeneration.from_pretrained``, ``AutoTokenizer.from_pretrained`` (``GemmaTokenizer``)
and ``Gemma3Processor.from_pretrained`` load with no network and no torchvision:

- ``config.json``, ``generation_config.json`` (eos ``<eos>`` and ``<end_of_turn>``), ``model.safetensors``
  (float32, seeded random weights, LM head tied to the embeddings as in the real model);
- ``tokenizer.json`` / ``tokenizer_config.json``: a Gemma-style BPE (spaces as ``▁``, byte fallback
  through ``<0x00>`` .. ``<0xFF>``, BOS added by the tokenizer) trained in-process on the corpus of
  :mod:`tritonvlm.testmodels.common`, with Gemma's special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
  ``<unk>`` 3, ``<mask>`` 4, ``<start_of_turn>``, ``<end_of_turn>``, ... ``<start_of_image>``,
  ``<end_of_image>``, ``<image_soft_token>`` last) and the ``boi_token`` / ``eoi_token`` / ``image_token``
  entries of ``extra_special_tokens`` that ``Gemma3Processor`` reads;
- ``chat_template.jinja``: Gemma 3's own chat template (it emits ``{{ bos_token }}``, so the prompt must
  not get a second BOS from the tokenizer; images as ``<start_of_image>``, which the processor expands to
  ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``);
- ``preprocessor_config.json`` / ``processor_config.json``: ``Gemma3ImageProcessor`` (the torchvision-free
  ``Gemma3ImageProcessorPil`` loads it where torchvision is absent) resizing every image to a small square.

The text model has sliding-window and global layers like the real one. The multimodal projector's
``mm_input_projection_weight`` starts at zero in transformers (images would change nothing), so it is
randomised here. Builds are deterministic: the same size gives the same bytes in every file.

Sizes (float32 on disk):

- ``tiny`` (tests): text hidden 128, 4 layers (sliding, sliding, full, sliding; window 16), 4 heads (2 kv,
  head_dim 32), MLP 256; SigLIP hidden 64, 2 layers, 4 heads, MLP 128, 64x64 images in 8x8 patches,
  pooled to 16 tokens per image; vocab 2,048; ~0.9M parameters, builds in about a second.
- ``medium`` (CPU benchmarks): text hidden 512, 8 layers (5 sliding : 1 full as in the real model; window
  256), 8 heads (4 kv, head_dim 64), MLP 1536; SigLIP hidden 256, 4 layers, 4 heads, MLP 1024, 224x224
  images in 14x14 patches pooled to 64 tokens; vocab 32,768; ~40M parameters.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import Gemma3Config, Gemma3ForConditionalGeneration
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from tritonvlm.testmodels.common import (
    SEED,
    build_sized,
    log,
    save_greedy_model,
    training_texts,
    write_json,
)

__all__ = ["CHAT_TEMPLATE", "SIZES", "ModelSize", "build_test_model", "build_tokenizer"]

# Gemma's leading special tokens, in Gemma's id order (0 .. 4, then 105 and 106 in the real vocabulary).
HEAD_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback pieces
# The image tokens, last as in the real vocabulary (255999, 256000 and 262144 there).
IMAGE_SPECIALS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
SPECIAL_TOKENS = HEAD_SPECIALS + IMAGE_SPECIALS
EXTRA_SPECIAL_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}

# google/gemma-3-4b-it's chat template, verbatim.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


@dataclass(frozen=True)
class ModelSize:
    """The shape of one test model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    mm_tokens_per_image: int
    pseudo_words: int  # pseudo-words added to the corpus so BPE can reach vocab_size


S, F = "sliding_attention", "full_attention"

SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        layer_types=(S, S, F, S),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=16,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_layers=2,
        vision_heads=4,
        image_size=64,
        patch_size=8,
        mm_tokens_per_image=16,
        pseudo_words=2_000,
    ),
    "medium": ModelSize(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1536,
        layer_types=(S, S, S, S, S, F, S, S),
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        sliding_window=256,
        vision_hidden_size=256,
        vision_intermediate_size=1024,
        vision_layers=4,
        vision_heads=4,
        image_size=224,
        patch_size=14,
        mm_tokens_per_image=64,
        pseudo_words=60_000,
    ),
}


def build_tokenizer(vocab_size: int, texts: list[str]) -> Tokenizer:
    """A Gemma-style BPE with exactly ``vocab_size`` tokens: Gemma's leading specials, the 256 byte-fallback
    pieces, the learned pieces, then the image tokens. The pipeline is ``GemmaTokenizer``'s (which rebuilds
    it from the vocabulary and merges when it loads): spaces become ``▁`` and the whole text is one BPE
    word; merges never cross a ``▁`` because training splits words before it."""
    bpe_size = vocab_size - len(IMAGE_SPECIALS)
    trainer_tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=HEAD_SPECIALS + BYTE_TOKENS,
    )
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    if trainer_tok.get_vocab_size() != bpe_size:
        raise RuntimeError(f"BPE learned {trainer_tok.get_vocab_size()} tokens, wanted {bpe_size}")
    vocab = trainer_tok.get_vocab(with_added_tokens=True)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(trainer_tok)]

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", bos)]
    )
    assert tok.get_vocab_size() == vocab_size
    return tok


def _merges(tok: Tokenizer) -> list[Any]:
    """The learned merges of a trained BPE, in rank order."""
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, Any]:
    return {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }


def _tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json`` as google/gemma-3-4b-it has it (BOS added by the tokenizer)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": dict(EXTRA_SPECIAL_TOKENS),
        "mask_token": "<mask>",
        "model_max_length": 131072,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "Gemma3Processor",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _model_config(size: ModelSize, tok: Tokenizer) -> Gemma3Config:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": len(size.layer_types),
        "layer_types": list(size.layer_types),
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "head_dim": size.head_dim,
        "query_pre_attn_scalar": size.head_dim,
        "sliding_window": size.sliding_window,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        # As gemma-3-4b-it: linear RoPE scaling (x8) on the global layers, base 10k on the local ones.
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "bos_token_id": ids["<bos>"],
        "eos_token_id": ids["<eos>"],
        "pad_token_id": ids["<pad>"],
    }
    vision_config = {
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        "image_size": size.image_size,
        "patch_size": size.patch_size,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=size.mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
        dtype="float32",
    )


def _image_processor(size: ModelSize) -> dict[str, Any]:
    """``preprocessor_config.json``: Gemma 3's (mean/std 0.5, bilinear) at this model's image size."""
    processor = Gemma3ImageProcessorPil(
        size={"height": size.image_size, "width": size.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=2,
    )
    data = processor.to_dict()
    data.update(image_seq_length=size.mm_tokens_per_image, processor_class="Gemma3Processor")
    return data


def _build_into(tmp: Path, size: ModelSize) -> int:
    """Write every file of the model into ``tmp``; returns the parameter count."""
    t0 = time.perf_counter()
    tok = build_tokenizer(size.vocab_size, training_texts(size.pseudo_words))
    tok.save(str(tmp / "tokenizer.json"))
    write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok))
    (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    write_json(tmp / "preprocessor_config.json", _image_processor(size))
    write_json(
        tmp / "processor_config.json",
        {"image_seq_length": size.mm_tokens_per_image, "processor_class": "Gemma3Processor"},
    )
    log(f"tokenizer: {tok.get_vocab_size()} tokens ({time.perf_counter() - t0:.1f}s)")

    t1 = time.perf_counter()
    config = _model_config(size, tok)
    # Seeded random init on CPU, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(SEED)
        model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():  # zero in transformers' init: images would have no effect
            projection.normal_(0.0, size.vision_hidden_size**-0.5)
    text = config.text_config
    end_of_turn = tok.token_to_id("<end_of_turn>")
    eos = [text.eos_token_id, end_of_turn]
    return save_greedy_model(model, tmp, t1, text.bos_token_id, eos, text.pad_token_id)


def build_test_model(out_dir: str | os.PathLike[str], size: str = "tiny") -> Path:
    """Write a random-weight Gemma 3 checkpoint of ``size`` (``tiny`` or ``medium``) to ``out_dir``.

    Works offline and is deterministic (same size, same bytes); see
    :func:`tritonvlm.testmodels.common.write_model_dir`. Returns the directory.
    """
    return build_sized(out_dir, size, SIZES, "Gemma 3", _build_into)
