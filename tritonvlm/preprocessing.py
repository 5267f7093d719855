"""Conversation + image bytes → model inputs (image decode, then the family's chat template, resize and
tokenization)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from tritonvlm.families.base import Family, ProcessedPrompt
from tritonvlm.wire import InvalidRequestError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


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
    """Turns one request (a conversation and its image files, or a raw prompt) into model inputs with
    the model family's processor and chat template."""

    def __init__(
        self, family: Family, processor: Any, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> None:
        self.family = family
        self.processor = processor
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> ChatPreprocessor:
        """The preprocessor of a checkpoint: its family (from ``config.json``) and processor."""
        from tritonvlm.families import family_for_model

        family = family_for_model(path_or_id)
        return cls(family, family.load_processor(path_or_id), max_image_pixels)

    def encode_prompt(self, prompt: str) -> ProcessedPrompt:
        """A raw text prompt (``/v1/completions``): tokenized as is, no template, no images."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string", "prompt")
        return self.family.encode_raw_prompt(self.processor, prompt)

    def __call__(self, messages: Any, images: list[bytes]) -> ProcessedPrompt:
        conversation, num_placeholders = normalize_messages(messages)
        if num_placeholders != len(images):
            raise InvalidRequestError(
                f"the messages hold {num_placeholders} image parts but {len(images)} images were sent",
                "images",
            )
        self.family.check_images(len(images))
        pil_images = [decode_image(data, i, self.max_image_pixels) for i, data in enumerate(images)]
        return self.family.process(self.processor, conversation, pil_images)
