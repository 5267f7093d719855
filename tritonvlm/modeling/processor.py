"""Loading any supported model and its processor by checkpoint (its family comes from ``config.json``).

Thin conveniences over :mod:`tritonvlm.families` for scripts; the server itself goes through the
family objects. ``ImageOnlyQwen2_5_VLProcessor`` stays importable for older scripts.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoProcessor, Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from tritonvlm.families import family_for_model
from tritonvlm.families.base import has_torchvision, image_only_processor

__all__ = ["ImageOnlyQwen2_5_VLProcessor", "has_torchvision", "load_model", "load_processor", "register"]

ImageOnlyQwen2_5_VLProcessor = image_only_processor(Qwen2_5_VLProcessor)


def register() -> None:
    """Make ``AutoProcessor`` build :class:`ImageOnlyQwen2_5_VLProcessor` for ``Qwen2_5_VLConfig``
    (for code that loads a Qwen2.5-VL test model through ``AutoProcessor``). Idempotent."""
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


register()


def load_processor(path_or_id: str, **kwargs: Any) -> Any:
    """The torchvision-free processor of a checkpoint of any supported family."""
    return family_for_model(path_or_id).load_processor(path_or_id, **kwargs)


def load_model(
    path_or_id: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> Any:
    """The checkpoint's ``*ForConditionalGeneration`` model on ``device``, in eval mode (``dtype=None``:
    the checkpoint's own)."""
    return family_for_model(path_or_id).load_model(path_or_id, device=device, dtype=dtype)
