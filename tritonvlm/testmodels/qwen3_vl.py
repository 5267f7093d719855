"""Random-weight Qwen3-VL checkpoints built offline, for tests and CPU benchmarks.

:func:`build_test_model` writes a directory laid out like ``Qwen/Qwen3-VL-8B-Instruct``, which
``Qwen3VLForConditionalGeneration.from_pretrained``, ``AutoTokenizer.from_pretrained`` and the
family's processor (:class:`tritonvlm.families.qwen3_vl.Qwen3VLFamily`) load with no network:

- ``config.json`` (``model_type`` ``qwen3_vl``: a Qwen3 text model with q/k norms and interleaved
  M-RoPE, a vision tower with learned position embeddings and DeepStack mergers),
  ``generation_config.json``, ``model.safetensors`` (float32, seeded random weights);
- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE trained in-process, followed by
  Qwen3's 26 added tokens in Qwen's order (``<|endoftext|>`` ... ``<|video_pad|>``, tool calls,
  fill-in-the-middle, ``<tool_response>``, ``<think>``);
- ``chat_template.jinja``: Qwen3-VL-Instruct's chat template (no default system prompt, tool calls,
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image);
- ``preprocessor_config.json``: the Qwen2-VL image processor as Qwen3-VL configures it (patch 16,
  merge 2, temporal patch 2, mean = std = 0.5) with small pixel limits: 64*64 to 512*512 pixels, i.e. 4
  to 256 image tokens (one per 32x32 pixels).

Sizes (the embeddings and LM head are most of the parameters):

- ``tiny`` (tests): text hidden 128, 3 layers, 4 heads (2 kv, head_dim 32, mrope_section [6, 5, 5]),
  MLP 256; vision hidden 64, depth 3, 4 heads, MLP 128, DeepStack from blocks 0 and 1 into decoder
  layers 0 and 1; 64 learned position embeddings; vocab 2,048; 1.47M parameters, ~6 MB, builds in about
  a second.
- ``medium`` (CPU benchmarks): text hidden 512, 8 layers, 8 heads (2 kv, head_dim 64, mrope_section
  [12, 10, 10]), MLP 1536; vision hidden 256, depth 4, 4 heads, MLP 1024, DeepStack from blocks 0, 1, 2;
  vocab 32,768; 67.6M parameters (vision 9.9M), ~273 MB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tritonvlm.testmodels.common import build_sized, training_texts
from tritonvlm.testmodels.qwen_common import QWEN3_VL_SPECIAL_TOKENS, build_qwen_into

__all__ = ["CHAT_TEMPLATE", "MAX_PIXELS", "MIN_PIXELS", "SIZES", "SPECIAL_TOKENS", "build_test_model"]

SPECIAL_TOKENS = QWEN3_VL_SPECIAL_TOKENS
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 64 * 64  # 4096: at least 4x4 patches = 4 merged image tokens
MAX_PIXELS = 512 * 512  # 262144: at most 32x32 patches = 256 merged image tokens
MODEL_MAX_LENGTH = 262144

# Qwen3-VL-*-Instruct's chat template (chat_template.json of Qwen/Qwen3-VL-8B-Instruct).
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are \
provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments \
within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class ModelSize:
    """The shape of one Qwen3-VL test model."""

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
    deepstack_visual_indexes: tuple[int, ...]
    num_position_embeddings: int  # a square: the learned position grid of the vision tower
    pseudo_words: int  # pseudo-words added to the corpus so BPE can reach vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """Temporal/height/width frequencies (interleaved), in Qwen3-VL's 24:20:20 proportion."""
        half = self.head_dim // 2
        h = half * 20 // 64
        return [half - 2 * h, h, h]


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_depth=3,
        vision_num_heads=4,
        deepstack_visual_indexes=(0, 1),
        num_position_embeddings=64,
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
        deepstack_visual_indexes=(0, 1, 2),
        num_position_embeddings=256,
        pseudo_words=60_000,
    ),
}


def _model_config(size: ModelSize, ids: dict[str, int]) -> Qwen3VLConfig:
    text_config = {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "head_dim": size.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": size.mrope_section,
            "mrope_interleaved": True,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": size.vision_depth,
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_heads": size.vision_num_heads,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "out_hidden_size": size.hidden_size,
        "num_position_embeddings": size.num_position_embeddings,
        "deepstack_visual_indexes": list(size.deepstack_visual_indexes),
    }
    return Qwen3VLConfig(
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
            size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
            patch_size=PATCH_SIZE,
            merge_size=MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        make_config=lambda ids: _model_config(size, ids),
        model_class=Qwen3VLForConditionalGeneration,
    )


def build_test_model(out_dir: str | os.PathLike[str], size: str = "tiny") -> Path:
    """Write a random-weight Qwen3-VL checkpoint of ``size`` (``tiny`` or ``medium``) to ``out_dir``
    (offline, deterministic; see :func:`tritonvlm.testmodels.common.write_model_dir`)."""
    return build_sized(out_dir, size, SIZES, "Qwen3-VL", _build_into)
