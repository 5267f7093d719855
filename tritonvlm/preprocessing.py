"""Conversation + image bytes → model inputs (image decode, then the family's chat template, resize and
tokenization)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from jinja2 import TemplateError
from PIL import Image

from tritonvlm.families.base import Family, ProcessedPrompt
from tritonvlm.image_layout import (
    layout_images,
    pack_image_layouts,
    record_layout,
    stand_in_images,
    tapped,
    unpack_image_layouts,
)
from tritonvlm.tool_format import prepare_tools
from tritonvlm.wire import InvalidRequestError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TOOL_KEYS = ("tool_calls", "tool_call_id")  # kept on messages for the chat template (tool_format)
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Text is refused above this many characters before any tokenization (a token is rarely more than a
# few characters: a million characters is far beyond any context length served here).
DEFAULT_MAX_PROMPT_CHARS = 1 << 20


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
        extra = {k: msg[k] for k in TOOL_KEYS if msg.get(k) is not None}
        if isinstance(content, str):
            out.append({"role": role, "content": content, **extra})
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
        out.append({"role": role, "content": parts, **extra})
    return out, num_images


def special_token_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special (control) tokens as text, longest first."""
    tokens = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added.content))
    return sorted((t for t in tokens if t), key=len, reverse=True)


def message_texts(conversation: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """``(param, text)`` for every piece of text in a normalized conversation."""
    for i, msg in enumerate(conversation):
        content = msg["content"]
        if isinstance(content, str):
            yield f"messages[{i}].content", content
            continue
        for j, part in enumerate(content):
            if part.get("type") == "text":
                yield f"messages[{i}].content[{j}].text", part["text"]


class ChatPreprocessor:
    """Turns one request (a conversation and its image files, or a raw prompt) into model inputs with
    the model family's processor and chat template.

    The model's special tokens (``<|im_start|>``, ``<|image_pad|>``, ``<start_of_turn>``, ...) typed into
    the text of a message are refused with a 400: the chat template would turn them into real control
    tokens (a fake role marker, an image placeholder without an image). Raw prompts
    (``/v1/completions``) are the caller's own token stream and may hold them.
    """

    def __init__(
        self,
        family: Family,
        processor: Any,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    ) -> None:
        self.family = family
        self.processor = processor
        self.max_image_pixels = max_image_pixels
        self.max_prompt_chars = max_prompt_chars
        self.special_tokens = special_token_strings(processor.tokenizer)

    @classmethod
    def from_pretrained(cls, path_or_id: str, **limits: int) -> ChatPreprocessor:
        """The preprocessor of a checkpoint: its family (from ``config.json``) and processor."""
        from tritonvlm.families import family_for_model

        family = family_for_model(path_or_id)
        return cls(family, family.load_processor(path_or_id), **limits)

    def encode_prompt(self, prompt: str) -> ProcessedPrompt:
        """A raw text prompt (``/v1/completions``): tokenized as is, no template, no images."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string", "prompt")
        self._check_length(len(prompt), "prompt")
        return self.family.encode_raw_prompt(self.processor, prompt)

    def __call__(
        self,
        messages: Any,
        images: list[bytes],
        tools: list[dict[str, Any]] | None = None,
        layout: bytes | None = None,
    ) -> ProcessedPrompt:
        """The prompt ids and multimodal tensors of a conversation with its image files, and the
        images' layout (:mod:`tritonvlm.image_layout`). Given the ``layout`` of images seen before
        instead of the files, the same prompt is built without decoding or processing any image: its
        multimodal tensors are then only the family's prompt-dependent ones (``prompt_mm_tensors``).

        Families that process each image on its own (``Family.per_image_preprocessing``) return one
        layout per image (``pack_image_layouts``), and take layouts of some of the images: those
        images' files are then empty, they are neither decoded nor processed, and the multimodal
        tensors and layouts returned are the other images' only."""
        known = unpack_image_layouts(layout) if layout is not None else None
        if known is not None:
            if not self.family.per_image_preprocessing:
                raise ValueError(f"{self.family.name} takes one layout for all of a request's images")
            if any(not 0 <= i < len(images) or images[i] for i in known):
                raise InvalidRequestError(
                    "an image sent with its layout must come without its file", "images"
                )
            layout = None
        elif layout is not None and images:
            raise InvalidRequestError("send either the images or their layout, not both", "images")
        conversation, num_placeholders = normalize_messages(messages)
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.processor.tokenizer, "chat_template", None
        )
        conversation, template_kwargs = prepare_tools(conversation, tools, template, self.family.tool_format)
        num_images = len(images) if layout is None else layout_images(layout)
        if num_placeholders != num_images:
            raise InvalidRequestError(
                f"the messages hold {num_placeholders} image parts but {num_images} images were sent",
                "images",
            )
        self.check_text(conversation)
        self.family.check_images(num_images)
        if layout is None:
            stand_in = stand_in_images(1)[0]
            pil_images = [
                stand_in if known and i in known else decode_image(data, i, self.max_image_pixels)
                for i, data in enumerate(images)
            ]
        else:
            pil_images = stand_in_images(num_images)
        per_image = self.family.per_image_preprocessing and layout is None
        processor, tap = (
            tapped(self.processor, layout, per_image, known) if pil_images else (self.processor, None)
        )
        try:
            out = self.family.process(processor, conversation, pil_images, template_kwargs)
        except InvalidRequestError:
            raise
        except TemplateError as exc:
            raise InvalidRequestError(
                f"the model's chat template refused the conversation: {exc}", "messages"
            ) from exc
        except ValueError as exc:
            # The processor's own limits (e.g. an aspect ratio over 200:1) are the client's to fix.
            what = "the images" if pil_images else "the conversation"
            param = "messages" if not pil_images else "images"
            raise InvalidRequestError(f"the model's processor cannot take {what}: {exc}", param) from exc
        if layout is not None:
            out.mm = {name: out.mm[name] for name in self.family.prompt_mm_tensors if name in out.mm}
            out.layout = layout
        elif tap is not None and per_image:
            self._keep_new_images(out, tap, known or {})
        elif tap is not None and tap.output is not None:
            out.layout = record_layout(tap.output, num_images)
        return out

    def _keep_new_images(self, out: ProcessedPrompt, tap: Any, known: dict[int, bytes]) -> None:
        """Per-image processing: the layout of each processed image, and, where some images were
        replayed from their layouts, the multimodal tensors of the processed ones only."""
        layouts = {i: record_layout(output, 1) for i, output in tap.outputs.items()}
        out.layout = None if None in layouts.values() else pack_image_layouts(layouts)
        if not known:
            return
        parts = self.family.split_images(out.mm)
        if parts is None or len(parts) != out.num_images:
            raise ValueError(f"{self.family.name}: the processed images do not split one part per image")
        new = [parts[i] for i in range(len(parts)) if i not in known]
        out.mm = self.family.join_images(new) if new else {}

    def check_text(self, conversation: list[dict[str, Any]]) -> None:
        """Refuse over-long text before any tokenization, and special tokens typed as text."""
        texts = list(message_texts(conversation))
        self._check_length(sum(len(text) for _, text in texts), "messages")
        for param, text in texts:
            for token in self.special_tokens:
                if token in text:
                    raise InvalidRequestError(
                        f"{param} contains {token!r}, one of the model's special tokens; they cannot be sent "
                        "as text (use image_url parts for images, and roles for turns)",
                        param,
                    )

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the text is {chars} characters long, over the limit of {self.max_prompt_chars}", param
            )
