"""LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf``): a SigLIP tower, a two-layer
projector and a Qwen2 text model (1-D positions, full attention).

Images are cut into fixed-size tiles (anyres). An image alone in its prompt is its base tile (the whole
image resized) plus a grid of tiles picked from ``image_grid_pinpoints`` for its size; its grid features
are un-padded to the image's aspect ratio, get one ``image_newline`` per row and, past the
``vision_aspect_ratio`` limit (``anyres_max_9``), are interpolated down: the number of ``<image>``
tokens depends on the image size. An image that shares its prompt with others is its base tile alone
plus one newline. ``get_image_features`` tells the two apart by ``batch_num_images`` (images per
prompt), so the processor must see a prompt's images as one nested list, as the chat-template path
gives them.

Encoder batching across requests: every tile has the same shape (``image_size``² pixels), only their
number differs, so the tiles of all requests are concatenated along the tile axis and encoded in one
tower forward, then split back per image. Nothing is padded: padding each request to the largest tile
count (what the processor's 5-D ``pixel_values`` does within one call) would run the tower on up to
36 all-zero tiles per request. Groups are capped at :attr:`LlavaOnevisionFamily.max_tiles_per_forward`
tiles to bound the tower's activation memory (a single request is never split).

Image-cache entries: the images of a multi-image prompt are each their base tile alone, so each is an
entry of its own (:meth:`LlavaOnevisionFamily.split_images`, marked ``in_company``); encoded without the
others, such an image still must not be tiled as if it were alone (:meth:`LlavaOnevisionFamily.as_sample`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from tritonvlm.families.base import IMAGE_EMBEDS, Family, ProcessedPrompt

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

PIXELS = "pixel_values"  # float32 [tiles of all images, 3, image_size, image_size], prompt order
SIZES = "image_sizes"  # int64 [images, 2]: each image's original (height, width)
# Marks the encoder input of images cut from a prompt with several (one per image, any value): each is
# its base tile alone, whatever the number of images encoded with it.
COMPANY = "in_company"


class LlavaOnevisionFamily(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor
    checkpoints = (
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava-hf/llava-onevision-qwen2-72b-ov-hf",
    )
    # At most this many tiles go through the tower in one forward (several requests' tiles together).
    max_tiles_per_forward: int = 64

    @classmethod
    def build_test_model(cls, out_dir: str, size: str = "tiny") -> Any:
        from tritonvlm.testmodels.llava_onevision import build_test_model

        return build_test_model(out_dir, size=size)

    # ---- preprocessing ------------------------------------------------------------------------------
    def render_prompt(
        self,
        processor: Any,
        conversation: list[dict[str, Any]],
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The checkpoint's template renders only list contents: a plain string becomes one text part
        (else it would silently vanish from the prompt)."""
        return super().render_prompt(processor, as_parts(conversation), template_kwargs)

    def process_text(self, processor: Any, prompt: str, images: list[Image.Image]) -> ProcessedPrompt:
        """The processor sees the prompt's images as one nested list (``batch_num_images = [n]``), as
        in the chat-template path; a flat list would tile each image as if it were alone."""
        encoded = processor(text=[prompt], images=[images] if images else None, return_tensors="np")
        ids = np.asarray(encoded["input_ids"][0], dtype=np.int64)
        mm = self.multimodal_inputs(encoded) if images else {}
        return ProcessedPrompt(input_ids=ids, mm=mm, num_images=len(images))

    def multimodal_inputs(self, encoded: Any) -> dict[str, np.ndarray]:
        """The tiles of the prompt's images, concatenated without the processor's padding to the largest
        tile count, and the images' original sizes."""
        pixels = np.asarray(encoded[PIXELS], dtype=np.float32)  # [images, max tiles, 3, H, W]
        sizes = np.asarray(encoded[SIZES], dtype=np.int64).reshape(-1, 2)
        counts = self.tiles_per_image(sizes)
        tiles = np.concatenate([image[:n] for image, n in zip(pixels, counts, strict=True)])
        return {PIXELS: tiles, SIZES: sizes}

    def tiles_per_image(self, sizes: np.ndarray | torch.Tensor) -> list[int]:
        """Tiles of each image of one prompt: the base tile plus its anyres grid when the image is
        alone in the prompt, the base tile only otherwise (as ``get_image_features`` reads them)."""
        if len(sizes) != 1:
            return [1] * len(sizes)
        grid, tile = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        return [image_size_to_num_patches([int(v) for v in sizes[0]], grid, tile)]

    # ---- vision encoder -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: Any, batch: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """The tiles of several requests in one tower forward per group (see the module docstring)."""
        samples = [self.as_sample(mm) for mm in batch]
        out: list[dict[str, torch.Tensor]] = []
        keep = iter([kept for _, kept in samples])
        for group in self.groups([mm for mm, _ in samples]):
            sizes = [mm[SIZES].long().reshape(-1, 2) for mm in group]
            features = model.model.get_image_features(
                pixel_values=self.to_model(model, torch.cat([mm[PIXELS] for mm in group])),
                image_sizes=torch.cat(sizes),
                batch_num_images=torch.tensor([len(s) for s in sizes]),
            )
            per_image = list(getattr(features, "pooler_output", features))
            for s in sizes:
                mine, per_image = per_image[: len(s)], per_image[len(s) :]
                out.append({IMAGE_EMBEDS: torch.cat(mine[: next(keep)])})
        return out

    @staticmethod
    def as_sample(mm: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """What the tower takes for one request's encoder input, and how many of its images to keep.
        Images cut from a prompt with several (:meth:`split_images`) are each one base tile: encoded
        as a prompt of several images, even one alone (it goes with a copy of itself, whose output is
        dropped: ``get_image_features`` tiles an image that is alone in its prompt)."""
        count = int(mm[SIZES].reshape(-1, 2).shape[0])
        if COMPANY not in mm:
            return mm, count
        if count > 1:
            return {PIXELS: mm[PIXELS], SIZES: mm[SIZES]}, count
        return {PIXELS: mm[PIXELS].repeat(2, 1, 1, 1), SIZES: mm[SIZES].reshape(-1, 2).repeat(2, 1)}, 1

    # ---- per-image cache entries ----------------------------------------------------------------------
    def split_images(self, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
        """The images of a prompt with several (each its base tile alone), marked as such; an image
        alone in its prompt is tiled by its size and stays one entry."""
        pixels, sizes = inputs.get(PIXELS), inputs.get(SIZES)
        if pixels is None or sizes is None or len(inputs) != 2:
            return None
        sizes = sizes.reshape(-1, 2)
        if len(sizes) < 2 or pixels.shape[0] != len(sizes):
            return None
        company = np.ones(1, dtype=np.int64)
        return [
            {PIXELS: pixels[i : i + 1], SIZES: sizes[i : i + 1], COMPANY: company} for i in range(len(sizes))
        ]

    def split_encoded(
        self, encoded: dict[str, np.ndarray], images: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        """Each image is one base tile and its newline: the same number of rows each."""
        return [{IMAGE_EMBEDS: rows} for rows in np.split(encoded[IMAGE_EMBEDS], len(images))]

    def groups(self, batch: list[dict[str, torch.Tensor]]) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Consecutive requests with at most :attr:`max_tiles_per_forward` tiles together (a request
        with more goes alone)."""
        group: list[dict[str, torch.Tensor]] = []
        tiles = 0
        for mm in batch:
            n = int(mm[PIXELS].shape[0])
            if group and tiles + n > self.max_tiles_per_forward:
                yield group
                group, tiles = [], 0
            group.append(mm)
            tiles += n
        if group:
            yield group


def as_parts(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with every plain-string content as one text part."""
    return [
        {**msg, "content": [{"type": "text", "text": msg["content"]}]}
        if isinstance(msg.get("content"), str)
        else msg
        for msg in conversation
    ]
