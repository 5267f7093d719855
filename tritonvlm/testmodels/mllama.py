"""Random-weight Llama 3.2 Vision (``mllama``) checkpoints built offline, for tests and CPU benchmarks.

:func:`build_test_model` writes a directory laid out like ``meta-llama/Llama-3.2-11B-Vision-Instruct``,
which ``MllamaForConditionalGeneration.from_pretrained``, ``AutoTokenizer.from_pretrained`` and the
family's processor (:class:`tritonvlm.families.mllama.MllamaFamily`) load with no network:

- ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32, seeded random weights);
- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE trained in-process, then Llama 3's
  named special tokens in Llama's order (``<|begin_of_text|>``, ``<|end_of_text|>``, ...,
  ``<|eot_id|>``, ``<|python_tag|>``) and last ``<|image|>``, whose id equals the text vocabulary size
  as in the real checkpoint (128256 there: the embedding table has 8 rows more than the LM head).
  The tokenizer's post-processor prepends ``<|begin_of_text|>`` like Llama 3's;
- ``chat_template.jinja``: shaped like the real one (it emits ``{{ bos_token }}``; a default system
  block with the knowledge cut-off and today's date when the conversation has no image; images refused
  together with a system message; ``<|image|>`` for each image part);
- ``preprocessor_config.json``: the Mllama image processor (up to 4 tiles, CLIP normalisation) with a
  small tile for CPU work: 56x56 px in ``tiny`` (17 patches of 14 px per tile with the class token,
  68 cross-attention states per image), 112x112 px in ``medium`` (65 per tile, 260 per image).

The cross-attention gates (and the vision tower's tile and position gates), which transformers
initialises to zero, are set to random non-zero values: with zero gates the image has no effect.
Builds are deterministic: the same size gives the same bytes in every file.

Sizes (parameters counted on the built model; float32 on disk):

- ``tiny`` (tests): text hidden 128, 4 layers of which 2 cross-attention ([1, 3]), 4 heads (2 kv,
  head_dim 32), MLP 256; vision hidden 32, 2 + 1 global layers, 2 heads; vocab 2,048 (+ ``<|image|>``).
- ``medium`` (CPU benchmarks): text hidden 512, 10 layers of which 2 cross-attention ([3, 8]), 8 heads
  (2 kv, head_dim 64), MLP 1536; vision hidden 128, 4 + 2 global layers, 4 heads; vocab 32,768.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, processors
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

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

__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "SIZES", "SPECIAL_TOKENS", "ModelSize", "build_test_model"]

BOS, EOT, EOM, END = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
IMAGE_TOKEN = "<|image|>"
PATCH_SIZE = 14
MAX_TILES = 4
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Llama 3's named special tokens in their id order (128000 ... 128010 there), then <|image|> (128256).
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    (BOS, True),
    (END, True),
    ("<|reserved_special_token_0|>", True),
    ("<|reserved_special_token_1|>", True),
    (PAD, True),
    ("<|step_id|>", True),
    ("<|start_header_id|>", True),
    ("<|end_header_id|>", True),
    (EOM, True),
    (EOT, True),
    ("<|python_tag|>", True),
    (IMAGE_TOKEN, True),
]

# The shape of Llama-3.2-11B-Vision-Instruct's template (tool calling kept; tool messages as there).
CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\\n" }}
    {{- "Today Date: " + date_string + "\\n\\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\\n\\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\\n\\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501 (the real template's lines)


@dataclass(frozen=True)
class ModelSize:
    """The shape of one test model."""

    vocab_size: int  # the text model's (LM head) vocabulary; <|image|> is the next id
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    cross_attention_layers: tuple[int, ...]
    num_attention_heads: int
    num_key_value_heads: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_global_layers: int
    vision_heads: int
    intermediate_layers_indices: tuple[int, ...]
    tile_size: int  # the image processor's tile (= the vision config's image_size)
    pseudo_words: int  # pseudo-words added to the corpus so BPE can reach vocab_size

    @property
    def vision_output_dim(self) -> int:
        """The final hidden state concatenated with the intermediate layers' ones."""
        return self.vision_hidden_size * (1 + len(self.intermediate_layers_indices))

    @property
    def states_per_image(self) -> int:
        """Cross-attention states per image: tiles x (patches per tile + the class token)."""
        return MAX_TILES * ((self.tile_size // PATCH_SIZE) ** 2 + 1)


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        cross_attention_layers=(1, 3),
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_layers=2,
        vision_global_layers=1,
        vision_heads=2,
        intermediate_layers_indices=(0, 1),
        tile_size=56,
        pseudo_words=2_000,
    ),
    "medium": ModelSize(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=10,
        cross_attention_layers=(3, 8),
        num_attention_heads=8,
        num_key_value_heads=2,
        vision_hidden_size=128,
        vision_intermediate_size=512,
        vision_layers=4,
        vision_global_layers=2,
        vision_heads=4,
        intermediate_layers_indices=(1, 3),
        tile_size=112,
        pseudo_words=60_000,
    ),
}


def build_tokenizer(size: ModelSize) -> Tokenizer:
    """A byte-level BPE whose last ids are Llama 3's special tokens and ``<|image|>`` (id
    ``size.vocab_size``), prepending ``<|begin_of_text|>`` like Llama 3's tokenizer."""
    tok = train_bpe(size.vocab_size + 1, training_texts(size.pseudo_words), SPECIAL_TOKENS)
    assert tok.token_to_id(IMAGE_TOKEN) == size.vocab_size
    bos = (BOS, tok.token_to_id(BOS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[bos]
    )
    return tok


def _tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json`` as Llama-3.2-11B-Vision-Instruct has it."""
    return {
        "added_tokens_decoder": added_tokens_decoder(tok, SPECIAL_TOKENS),
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _model_config(size: ModelSize, tok: Tokenizer) -> MllamaConfig:
    ids = {token: tok.token_to_id(token) for token, _ in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "cross_attention_layers": list(size.cross_attention_layers),
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[END],
        "pad_token_id": ids[PAD],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_hidden_layers": size.vision_layers,
        "num_global_layers": size.vision_global_layers,
        "attention_heads": size.vision_heads,
        "image_size": size.tile_size,
        "patch_size": PATCH_SIZE,
        "max_num_tiles": MAX_TILES,
        "intermediate_layers_indices": list(size.intermediate_layers_indices),
        "vision_output_dim": size.vision_output_dim,
    }
    return MllamaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids[IMAGE_TOKEN],
        dtype="float32",
    )


def randomise_gates(model: MllamaForConditionalGeneration, generator: torch.Generator) -> int:
    """Give every zero-initialised gate a value in [0.5, 1.5) (tanh 0.46 .. 0.91). Returns how many."""
    gates = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].endswith("gate")]
    with torch.no_grad():
        for gate in gates:
            gate.copy_(0.5 + torch.rand(gate.shape, generator=generator))
    return len(gates)


def _build_into(tmp: Path, size: ModelSize) -> int:
    """Write every file of the model into ``tmp``; returns the parameter count."""
    t0 = time.perf_counter()
    tok = build_tokenizer(size)
    tok.save(str(tmp / "tokenizer.json"))
    write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok))
    (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    log(f"tokenizer: {tok.get_vocab_size()} tokens ({time.perf_counter() - t0:.1f}s)")

    image_processor = MllamaImageProcessorPil(
        size={"height": size.tile_size, "width": size.tile_size},
        max_image_tiles=MAX_TILES,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    write_json(tmp / "preprocessor_config.json", image_processor.to_dict())

    t1 = time.perf_counter()
    config = _model_config(size, tok)
    # Seeded random init on CPU, without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(SEED)
        model = MllamaForConditionalGeneration(config).to(torch.float32).eval()
        randomise_gates(model, torch.Generator().manual_seed(SEED + 1))
    ids = {token: tok.token_to_id(token) for token, _ in SPECIAL_TOKENS}
    return save_greedy_model(model, tmp, t1, ids[BOS], [ids[END], ids[EOM], ids[EOT]], ids[PAD])


def build_test_model(out_dir: str | os.PathLike[str], size: str = "tiny") -> Path:
    """Write a random-weight Llama 3.2 Vision checkpoint of ``size`` (``tiny`` or ``medium``) to ``out_dir``.

    Works offline and is deterministic (same size, same bytes); see
    :func:`tritonvlm.testmodels.common.write_model_dir`. Returns the directory.
    """
    return build_sized(out_dir, size, SIZES, "Llama 3.2 Vision", _build_into)
