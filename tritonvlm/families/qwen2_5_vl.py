"""Qwen2.5-VL (``Qwen/Qwen2.5-VL-{3,7,32,72}B-Instruct``).

Images become a variable number of ``<|image_pad|>`` tokens (``grid_t * grid_h * grid_w / merge**2``);
the vision tower takes the patches of any number of images concatenated, with their grids; the decoder
uses 3-D M-RoPE positions from ``get_rope_index``, whose text positions then continue from the largest
position plus one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from tritonvlm.families.base import IMAGE_EMBEDS, Family
from tritonvlm.modeling.varlen_attention import use_varlen_attention

if TYPE_CHECKING:  # pragma: no cover
    from tritonvlm.engine.sequence import Sequence

GRID = "image_grid_thw"


class Qwen2_5_VLFamily(Family):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor
    checkpoints = (
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-72B-Instruct",
    )
    position_dims = 3

    @classmethod
    def build_test_model(cls, out_dir: str, size: str = "tiny") -> Any:
        from tritonvlm.testmodels.qwen2_5_vl import build_test_model

        return build_test_model(out_dir, size=size)

    def multimodal_inputs(self, encoded: Any) -> dict[str, np.ndarray]:
        return {
            "pixel_values": np.asarray(encoded["pixel_values"], dtype=np.float32),
            GRID: np.asarray(encoded[GRID], dtype=np.int64).reshape(-1, 3),
        }

    per_image_preprocessing = True

    def split_images(self, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
        """Each image's patches (``t * h * w`` rows) and grid: the tower attends within an image only."""
        pixels, grid = inputs.get("pixel_values"), inputs.get(GRID)
        if pixels is None or grid is None or len(inputs) != 2:
            return None
        grid = grid.reshape(-1, 3)
        rows = grid.prod(-1)
        if int(rows.sum()) != pixels.shape[0]:
            return None
        parts = np.split(pixels, np.cumsum(rows)[:-1])
        return [{"pixel_values": part, GRID: g[None]} for part, g in zip(parts, grid, strict=True)]

    def image_tokens(self, image: dict[str, np.ndarray]) -> int:
        return int(np.prod(image[GRID])) // self.merge_size() ** 2

    def strip_for_vision(self, model: Any) -> Any:
        """The tower alone, its windows and images attended in one SDPA call per length instead of one
        call per window (:mod:`tritonvlm.modeling.varlen_attention`)."""
        model = super().strip_for_vision(model)
        use_varlen_attention(model.model.visual.config)
        return model

    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @torch.inference_mode()
    def encode(self, model: Any, batch: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """All images of all requests in one tower forward (the tower keeps them apart by their grids)."""
        grids = [mm[GRID].long().reshape(-1, 3) for mm in batch]
        pixels = torch.cat([mm["pixel_values"] for mm in batch])
        features = self.tower_forward(model, pixels, torch.cat(grids))
        counts = [int(g.prod(-1).sum()) // self.merge_size() ** 2 for g in grids]
        out: list[dict[str, torch.Tensor]] = [{GRID: grid} for grid in grids]
        for key, rows in features.items():
            for result, part in zip(out, rows.split(counts), strict=True):
                result[key] = part
        return out

    def tower_forward(self, model: Any, pixels: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """The concatenated patches of several images → per key, ``[sum of image tokens, hidden]``
        (here only ``IMAGE_EMBEDS``; the rows of each image follow each other in grid order)."""
        return {IMAGE_EMBEDS: self.flatten_features(self.image_features(model, pixels, grid))}

    def image_features(self, model: Any, pixels: torch.Tensor, grid: torch.Tensor) -> Any:
        """``model.model.get_image_features`` for the concatenated patches of several images."""
        device = next(model.parameters()).device
        return model.model.get_image_features(
            pixel_values=self.to_model(model, pixels), image_grid_thw=grid.to(device)
        )

    def prompt_positions(self, seq: Sequence, device: torch.device) -> tuple[torch.Tensor, int]:
        grid = seq.mm.get(GRID)
        if grid is None or grid.numel() == 0:
            return super().prompt_positions(seq, device)
        ids = torch.tensor([seq.prompt_ids], device=device)
        positions, _ = self.rope_index(ids, grid.to(device))
        return positions[:, 0], int(positions.max()) + 1

    def rope_index(self, ids: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``get_rope_index`` of the model (3-D positions of a prompt with images)."""
        return self._rope_model.get_rope_index(
            ids, mm_token_type_ids=(ids == self.image_token_id).int(), image_grid_thw=grid
        )

    def bind(self, model: Any) -> None:
        """Keep the module whose ``get_rope_index`` computes positions (the engine calls this)."""
        self._rope_model = model.model
