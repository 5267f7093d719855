"""Qwen2-VL (``Qwen/Qwen2-VL-{2,7,72}B-Instruct``).

The same contract as Qwen2.5-VL (:mod:`tritonvlm.families.qwen2_5_vl`): a variable number of
``<|image_pad|>`` tokens per image (``grid_t * grid_h * grid_w / merge**2``), a vision tower that takes
the patches of any number of images concatenated with their grids (full attention in every block, no
window attention, LayerNorm + QuickGELU), and 3-D M-RoPE positions from the model's own
``get_rope_index``. Only the transformers classes differ.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from tritonvlm.families.qwen2_5_vl import Qwen2_5_VLFamily


class Qwen2VLFamily(Qwen2_5_VLFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration
    processor_class = Qwen2VLProcessor
    checkpoints = (
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen/Qwen2-VL-72B-Instruct",
    )

    @classmethod
    def build_test_model(cls, out_dir: str, size: str = "tiny") -> Any:
        from tritonvlm.testmodels.qwen2_vl import build_test_model

        return build_test_model(out_dir, size=size)
