"""Qwen3-VL (``Qwen/Qwen3-VL-{2,4,8,32}B-Instruct``, dense models).

Images become ``<|image_pad|>`` tokens as in Qwen2.5-VL (patch 16, merge 2: one token per 32x32 pixels)
and positions are 3-D M-RoPE from the model's ``get_rope_index`` (the text model interleaves the
temporal/height/width frequencies itself). Two differences matter to the engine:

- **DeepStack**: the vision tower also returns the merged features of a few of its inner blocks
  (``deepstack_visual_indexes``, one level each). At prefill, level ``k`` is added to the hidden states
  of the image positions after decoder layer ``k``. The encoder ships each level per request
  (``deepstack_<k>``, ``[image tokens, hidden]``, rows in prompt order like ``image_embeds``), and
  :meth:`Qwen3VLFamily.prefill_kwargs` builds what the text model takes for the padded prefill batch:
  ``visual_pos_masks`` ``[rows, length]`` and ``deepstack_visual_embeds``, one tensor per level whose
  rows are the image positions in batch order (row by row, left to right). Decode steps take none.
- The text model builds its masks with ``create_causal_mask``, which takes a 4-D tensor but not the
  ``{"full_attention": ...}`` dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from tritonvlm.families.base import IMAGE_EMBEDS
from tritonvlm.families.qwen2_5_vl import Qwen2_5_VLFamily
from tritonvlm.wire import InvalidRequestError

if TYPE_CHECKING:  # pragma: no cover
    from tritonvlm.engine.sequence import Sequence

DEEPSTACK = "deepstack_{}"  # key of deepstack level k in a request's multimodal dict


class Qwen3VLFamily(Qwen2_5_VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = Qwen3VLForConditionalGeneration
    processor_class = Qwen3VLProcessor
    checkpoints = (
        "Qwen/Qwen3-VL-2B-Instruct",
        "Qwen/Qwen3-VL-4B-Instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3-VL-32B-Instruct",
    )
    mask_as_dict = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.deepstack_levels = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())

    @classmethod
    def build_test_model(cls, out_dir: str, size: str = "tiny") -> Any:
        from tritonvlm.testmodels.qwen3_vl import build_test_model

        return build_test_model(out_dir, size=size)

    # ---- vision encoder -----------------------------------------------------------------------------
    def tower_forward(self, model: Any, pixels: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """The merged image embeddings and each deepstack level, ``[sum of image tokens, hidden]`` each."""
        features = self.image_features(model, pixels, grid)
        out = {IMAGE_EMBEDS: self.flatten_features(features)}
        for level, per_image in enumerate(features.deepstack_features):
            out[DEEPSTACK.format(level)] = self.flatten_features(per_image)
        return out

    # ---- decoder ------------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], mm: dict[str, torch.Tensor]) -> None:
        super().validate(prompt_ids, mm)
        embeds = mm.get(IMAGE_EMBEDS)
        if embeds is None:
            return
        for level in range(self.deepstack_levels):
            rows = mm.get(DEEPSTACK.format(level))
            if rows is None or rows.shape != embeds.shape:
                raise InvalidRequestError(
                    f"deepstack level {level} of the image embeddings is missing or does not match them",
                    "messages",
                )

    def prefill_kwargs(self, seqs: list[Sequence], length: int, device: torch.device) -> dict[str, Any]:
        """``visual_pos_masks`` over the padded batch and the deepstack levels of its image positions
        (nothing when no prompt of the batch has an image)."""
        rows = [i for i, s in enumerate(seqs) if s.mm.get(IMAGE_EMBEDS) is not None]
        if not rows or not self.deepstack_levels:
            return {}
        mask = torch.zeros(len(seqs), length, dtype=torch.bool, device=device)
        chunks = {}  # the image rows of each prompt's computed range (earlier ones are in the cache)
        for i in rows:
            ids = torch.tensor(seqs[i].prompt_ids, device=device)
            start, end = seqs[i].prefill_range
            here = ids[start:end] == self.image_token_id  # (past the prompt: a resumed sequence's text)
            mask[i, : here.numel()] = here
            skipped = int((ids[:start] == self.image_token_id).sum())
            chunks[i] = slice(skipped, skipped + int(here.sum()))
        if not bool(mask.any()):
            return {}
        dtype = self._dtype
        levels = [
            torch.cat([seqs[i].mm[DEEPSTACK.format(k)][chunks[i]] for i in rows]).to(device, dtype)
            for k in range(self.deepstack_levels)
        ]
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": levels}

    def bind(self, model: Any) -> None:
        super().bind(model)
        self._dtype = next(model.parameters()).dtype
