"""Gemma 3 (``google/gemma-3-{4,12,27}b-it``).

- Every image is resized to one square (896x896 in the real models; no pan-and-scan by default) and becomes
  ``mm_tokens_per_image`` (256) ``<image_soft_token>`` embeddings from SigLIP + an average-pooling projector,
  so images of any size batch in the tower by concatenation.
- The chat template emits ``<bos>`` itself: the tokenizer must not add a second one (the base class's
  :meth:`~tritonvlm.families.base.Family.process_text` sees the template's BOS and passes
  ``add_special_tokens=False``).
- Text layers are sliding-window (local, ``sliding_window`` tokens, 1024 in the real models) or global;
  ``text_config.layer_types`` says which, and the engine keeps only a ring of ``window`` keys/values for the
  local layers (see :mod:`tritonvlm.engine.kv_cache`).
- At prefill the tokens of one image attend to each other both ways (``token_type_ids`` in transformers):
  the full layers take ``causal OR same-image``, the sliding layers ``(causal OR same-image) AND key >
  query - window``. Decode steps are plain causal.
- The embedding layer scales by ``sqrt(hidden_size)`` (image embeddings are merged after it, unscaled, as in
  transformers). No final logit soft-capping: Gemma 3 configs set ``final_logit_softcapping`` to null, and
  ``Gemma3ForConditionalGeneration`` does not apply it even where a config sets it (only the text-only
  ``Gemma3ForCausalLM`` does), so neither does this family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Gemma3ForConditionalGeneration
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

from tritonvlm.families.base import IMAGE_EMBEDS, Family

if TYPE_CHECKING:  # pragma: no cover
    from tritonvlm.engine.sequence import Sequence


class Gemma3Family(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    model_class = Gemma3ForConditionalGeneration
    processor_class = Gemma3Processor
    checkpoints = ("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it")

    @classmethod
    def build_test_model(cls, out_dir: str, size: str = "tiny") -> Any:
        from tritonvlm.testmodels.gemma3 import build_test_model

        return build_test_model(out_dir, size=size)

    @classmethod
    def load_processor(cls, path_or_id: str, **kwargs: Any) -> Any:
        """``Gemma3Processor`` as is: it has no video half, and its image processor loads as
        ``Gemma3ImageProcessorPil`` where torchvision is absent."""
        return Gemma3Processor.from_pretrained(path_or_id, **kwargs)

    def norm_style(self, module: torch.nn.Module) -> str | None:
        """Gemma's RMSNorm scales by ``1 + weight`` and rounds last (see the base class)."""
        return "gemma" if type(module).__name__ == "Gemma3RMSNorm" else super().norm_style(module)

    # ---- vision encoder -----------------------------------------------------------------------------
    def tokens_per_image(self) -> int:
        return int(self.config.mm_tokens_per_image)

    per_image_preprocessing = True

    def split_images(self, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
        """Each image (or pan-and-scan crop): the tower encodes every one on its own."""
        pixels = inputs.get("pixel_values")
        if pixels is None or len(inputs) != 1:
            return None
        return [{"pixel_values": pixels[i : i + 1]} for i in range(pixels.shape[0])]

    def image_tokens(self, image: dict[str, np.ndarray]) -> int:
        return self.tokens_per_image() * int(image["pixel_values"].shape[0])

    @torch.inference_mode()
    def encode(self, model: Any, batch: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """All images of all requests in one tower forward: every image (or pan-and-scan crop) has the
        same ``[3, size, size]`` shape, so the requests' pixels concatenate without padding."""
        counts = [int(mm["pixel_values"].shape[0]) for mm in batch]
        pixels = torch.cat([mm["pixel_values"] for mm in batch])
        features = model.model.get_image_features(pixel_values=self.to_model(model, pixels))
        embeds = self.flatten_features(features)
        per_request = embeds.split([n * self.tokens_per_image() for n in counts])
        return [{IMAGE_EMBEDS: part} for part in per_request]

    # ---- decoder ------------------------------------------------------------------------------------
    def image_blocks(self, prompt_ids: list[int], length: int, device: torch.device) -> torch.Tensor:
        """``[length]`` ids of the contiguous runs of image tokens in a prompt (0, 1, ...), -1 elsewhere
        (also on the padding after the prompt)."""
        ids = torch.full((length,), -1, dtype=torch.long, device=device)
        is_image = torch.tensor(prompt_ids, device=device) == self.image_token_id
        if not bool(is_image.any()):
            return ids
        previous = torch.nn.functional.pad(is_image, (1, 0))[:-1]
        starts = is_image & ~previous
        groups = torch.cumsum(starts.long(), 0) - 1
        ids[: len(prompt_ids)] = torch.where(is_image, groups, -1)
        return ids

    def attention_mask(self, masks: dict[str, torch.Tensor], seqs: list[Sequence], prefill: bool) -> Any:
        """At prefill, OR in attention both ways within each run of image tokens (in the sliding layers,
        only between keys within the window behind the query, as transformers composes it).

        A prefill after keys the slots hold (a later chunk: ``seq.prefill_range`` starts past 0) has
        the full layers' keys at their positions and the sliding layers' ring before the new keys; an
        image's tokens are all in one chunk (:meth:`chunk_end`), so only new keys are added."""
        if not prefill or self.image_token_id is None:
            return masks
        full = masks["full_attention"]
        queries = full.shape[-2]
        ranges = [s.prefill_range for s in seqs]
        news = [s.prompt_ids[k:e] for s, (k, e) in zip(seqs, ranges, strict=True)]  # (prompt tokens)
        blocks = torch.stack([self.image_blocks(ids, queries, full.device) for ids in news])
        same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        same_image = same_image[:, None]  # [rows, 1, query, new key]
        if not bool(same_image.any()):
            return masks
        out = dict(masks)
        placed = torch.zeros_like(full)  # (the full layers' keys are at their positions)
        for i, (k, _) in enumerate(ranges):
            width = min(queries, full.shape[-1] - k)
            placed[i, :, :, k : k + width] = same_image[i, :, :, :width]
        out["full_attention"] = full | placed
        if "sliding_attention" in masks:
            window = int(self.text_config.sliding_window)
            cols = torch.arange(queries, device=full.device)
            near = same_image & ((cols[:, None] - cols[None, :]) < window)  # key > query - window
            sliding = masks["sliding_attention"]
            ring = sliding.shape[-1] - queries  # (after keys in the slots: the ring's columns first)
            out["sliding_attention"] = torch.cat([sliding[..., :ring], sliding[..., ring:] | near], dim=-1)
        return out

    def chunk_end(self, seq: Sequence, end: int) -> int:
        """Not inside an image: before it, or after it where it is where the chunk starts."""
        ids, image = seq.prompt_ids, self.image_token_id
        if image is None or not 0 < end < len(ids) or ids[end] != image or ids[end - 1] != image:
            return end
        start = end
        while start > 0 and ids[start - 1] == image:
            start -= 1
        if start > seq.prefilled:
            return start
        while end < len(ids) and ids[end] == image:
            end += 1
        return end

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The LM head's logits as they are, as ``Gemma3ForConditionalGeneration`` returns them."""
        return logits
