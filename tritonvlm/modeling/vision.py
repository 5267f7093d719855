"""The vision tower on its own: pixel patches → image embeddings in the decoder's hidden size."""

from __future__ import annotations

import torch


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The ``visual`` module of a Qwen2.5-VL model."""
    return model.model.visual


@torch.inference_mode()
def encode_images(
    visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor
) -> torch.Tensor:
    """Embeddings of all images, concatenated in order: ``[sum(t*h*w) / merge**2, hidden]``.

    Several images (from several requests) go through one forward: the tower keeps them apart by
    their grid sizes.
    """
    param = next(visual.parameters())
    out = visual(pixel_values.to(param.device, param.dtype), grid_thw=grid_thw.to(param.device))
    embeds = getattr(out, "pooler_output", out)
    if isinstance(embeds, tuple | list):
        embeds = torch.cat(list(embeds))
    return embeds


def tokens_per_image(grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """How many embeddings (and ``<|image_pad|>`` tokens) each image yields."""
    return (grid_thw.prod(-1) // (merge_size**2)).tolist()
