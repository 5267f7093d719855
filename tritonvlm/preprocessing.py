"""Conversation + image bytes → model inputs (chat template, image decode and resize, tokenization)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tritonvlm.wire import InvalidRequestError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class ModelInputs:
    """What the vision encoder and the decoder need for one request."""

    input_ids: np.ndarray  # int64 [prompt_len]
    pixel_values: np.ndarray  # float32 [num_patches, patch_dim] (0 rows without images)
    image_grid_thw: np.ndarray  # int64 [num_images, 3]


def decode_image(data: bytes, index: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode one encoded image to RGB; refuse non-images and images over ``max_pixels`` before decoding."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise InvalidRequestError(
                f"image {index} is {width}x{height} pixels, over the limit of {max_pixels} pixels",
                f"images[{index}]",
            )
        img.load()
    except InvalidRequestError:
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        raise InvalidRequestError(
            f"image {index} could not be decoded as an image ({type(exc).__name__}: {exc})",
            f"images[{index}]",
        ) from exc
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: dropping alpha would turn transparent areas black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def normalize_messages(messages: Any) -> tuple[list[dict[str, Any]], int]:
    """Check the wire form of a conversation and return it for the chat template, with the number
    of image placeholders it holds."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    num_images = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", f"messages[{i}]")
        role = ROLES.get(msg.get("role"))
        if role is None:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {msg.get('role')!r}",
                f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content"
            )
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                parts.append({"type": "image"})
                num_images += 1
            else:
                raise InvalidRequestError(
                    f"messages[{i}].content[{j}] must be a text or image part", f"messages[{i}].content[{j}]"
                )
        out.append({"role": role, "content": parts})
    return out, num_images


class ChatPreprocessor:
    """Applies a Qwen2.5-VL processor to one request."""

    def __init__(self, processor: Any, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.processor = processor
        self.max_image_pixels = max_image_pixels
        ip = processor.image_processor
        self.patch_dim = int(getattr(ip, "temporal_patch_size", 2) * getattr(ip, "patch_size", 14) ** 2 * 3)

    def encode_prompt(self, prompt: str) -> ModelInputs:
        """A raw text prompt (``/v1/completions``): tokenized as is, no template, no images."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string", "prompt")
        ids = self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ModelInputs(
            input_ids=np.asarray(ids, dtype=np.int64),
            pixel_values=np.zeros((0, self.patch_dim), dtype=np.float32),
            image_grid_thw=np.zeros((0, 3), dtype=np.int64),
        )

    def __call__(self, messages: Any, images: list[bytes]) -> ModelInputs:
        conversation, num_placeholders = normalize_messages(messages)
        if num_placeholders != len(images):
            raise InvalidRequestError(
                f"the messages hold {num_placeholders} image parts but {len(images)} images were sent",
                "images",
            )
        pil_images = [decode_image(data, i, self.max_image_pixels) for i, data in enumerate(images)]
        prompt = self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        encoded = self.processor(text=[prompt], images=pil_images or None, return_tensors="np")
        input_ids = np.asarray(encoded["input_ids"][0], dtype=np.int64)
        if pil_images:
            pixel_values = np.asarray(encoded["pixel_values"], dtype=np.float32)
            grid = np.asarray(encoded["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
        else:
            pixel_values = np.zeros((0, self.patch_dim), dtype=np.float32)
            grid = np.zeros((0, 3), dtype=np.int64)
        return ModelInputs(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid)
