"""Loading a Qwen2.5-VL model and its processor without torchvision.

transformers' ``Qwen2_5_VLProcessor`` always wants a video processor, and every Qwen video processor
needs torchvision. We serve images only, so :class:`ImageOnlyQwen2_5_VLProcessor` drops the video
processor and keeps the image processor (``Qwen2VLImageProcessorPil``, the torchvision-free one, when
torchvision is missing) and the tokenizer. It is registered with ``AutoProcessor`` for
``Qwen2_5_VLConfig``, so ``AutoProcessor.from_pretrained`` builds it for a model directory that names no
processor class (the test models written by :mod:`tritonvlm.modeling.testmodel`).

A real checkpoint (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``) names ``Qwen2_5_VLProcessor`` in its
``preprocessor_config.json``; :func:`load_processor` loads it the normal way and, only where that fails
for want of torchvision, falls back to the image-only processor on the same files.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

log = logging.getLogger(__name__)

__all__ = [
    "ImageOnlyQwen2_5_VLProcessor",
    "has_torchvision",
    "load_model",
    "load_processor",
    "register",
]


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """A Qwen2.5-VL processor for text and images only: an image processor and a tokenizer, no video.

    Calls, chat templates and outputs are those of ``Qwen2_5_VLProcessor``: ``processor(text=[prompt],
    images=[...], return_tensors="pt")`` gives ``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_grid_thw`` and ``mm_token_type_ids``, and each ``<|image_pad|>`` of the prompt is expanded to
    ``grid_t * grid_h * grid_w / merge_size**2`` tokens.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Same token bookkeeping as Qwen2_5_VLProcessor.__init__, without handing a video processor on.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
        """Tokenize ``text`` and preprocess ``images``; videos are refused (there is no video processor)."""
        if videos is not None:
            raise ValueError(f"{type(self).__name__} handles text and images only; videos are not supported")
        return super().__call__(images=images, text=text, **kwargs)


def register() -> None:
    """Make ``AutoProcessor`` build :class:`ImageOnlyQwen2_5_VLProcessor` for ``Qwen2_5_VLConfig``.

    Idempotent; runs on import of this module.
    """
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


register()


def has_torchvision() -> bool:
    """Whether torchvision can be imported (transformers' Qwen video processor needs it)."""
    return importlib.util.find_spec("torchvision") is not None


def _is_qwen2_5_vl(path_or_id: str, **kwargs: Any) -> bool:
    try:
        return AutoConfig.from_pretrained(path_or_id, **kwargs).model_type == "qwen2_5_vl"
    except Exception:  # no readable config: not something we can help with
        return False


def load_processor(path_or_id: str, **kwargs: Any) -> Any:
    """The processor of a Qwen2.5-VL checkpoint (a local directory or a hub id).

    Goes through ``AutoProcessor.from_pretrained``. A checkpoint whose files name transformers'
    ``Qwen2_5_VLProcessor`` cannot be loaded that way without torchvision; for such a Qwen2.5-VL
    checkpoint the same files are loaded into :class:`ImageOnlyQwen2_5_VLProcessor` instead. Extra
    keyword arguments go to ``from_pretrained``.
    """
    register()
    try:
        return AutoProcessor.from_pretrained(path_or_id, **kwargs)
    except Exception as exc:
        if has_torchvision() or not _is_qwen2_5_vl(path_or_id, **kwargs):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.info(
            "AutoProcessor could not load %s without torchvision (%s: %s); using the image-only processor",
            path_or_id,
            type(exc).__name__,
            reason,
        )
        return ImageOnlyQwen2_5_VLProcessor.from_pretrained(path_or_id, **kwargs)


def load_model(
    path_or_id: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> Qwen2_5_VLForConditionalGeneration:
    """``Qwen2_5_VLForConditionalGeneration.from_pretrained(path_or_id)`` on ``device``, in eval mode.

    ``dtype`` is a torch dtype (or its name, e.g. ``"bfloat16"``); ``None`` keeps the dtype the
    checkpoint was saved in (``"auto"``: float32 for the test models, bfloat16 for Qwen's own).
    """
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path_or_id, dtype="auto" if dtype is None else dtype
    )
    return model.to(device).eval()
