"""What a request's images looked like to the model's processor, kept so that a prompt with the same
images can be built again without decoding or processing them.

A processor turns each image placeholder of the prompt into a run of tokens that depends on the
processed image (Qwen: its patch grid; LLaVA-OneVision: its size and tile shape; Gemma 3: its crops;
Llama 3.2 Vision: its tiles, in the cross-attention mask). It reads those from the output of its image
processor: the small tensors (grids, sizes, crop and tile counts) by value, the pixel tensors by shape
only. The *layout* of a set of images records exactly that: the small outputs' values and the large
ones' shapes and dtypes (:func:`record_layout`). Replaying it (:func:`replay_layout`) hands the
processor the same small values and zero-strided stand-ins of the right shapes for the pixels, so the
processor, unchanged and whatever the family, builds the very prompt it built with the images; only the
pixel tensors it returns are empty stand-ins (the vision encoder's output for these images comes from
the image-embedding cache instead).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from tritonvlm import wire

# Image-processor outputs up to this size travel by value; larger ones (pixels) by shape only.
VALUE_BYTES = 4096
# A stand-in larger than this many elements is refused: a processor may copy one (LLaVA-OneVision
# concatenates its tiles), and a forged layout must not make it allocate without bound.
MAX_STAND_IN_ELEMENTS = 1 << 28
_COUNT = "num_images"
_VALUE, _SHAPE, _LIST = "value", "shape", "list"


def record_layout(features: Mapping[str, Any], num_images: int) -> bytes | None:
    """The packed layout of one image-processor output (``None`` when a value is not numeric: such a
    processor's prompts are always built from the images)."""
    packed: dict[str, np.ndarray] = {_COUNT: np.asarray([num_images], dtype=np.int64)}
    for name, value in features.items():
        array = np.asarray(value)
        if array.dtype.kind not in "biuf" or "|" in name:
            return None
        if array.nbytes <= VALUE_BYTES:
            kind = _LIST if isinstance(value, list) else _VALUE
            packed[f"{kind}|{name}"] = array
        else:
            packed[f"{_SHAPE}|{name}|{array.dtype.str}"] = np.asarray(array.shape, dtype=np.int64)
    return wire.pack_tensors(packed)


def layout_images(layout: bytes) -> int:
    """How many images a packed layout describes."""
    return int(wire.unpack_tensors(layout)[_COUNT][0])


def replay_features(layout: bytes) -> dict[str, Any]:
    """The image-processor output a layout describes: small values as recorded, large tensors as
    read-only zero-strided stand-ins of their shape and dtype."""
    features: dict[str, Any] = {}
    for key, array in wire.unpack_tensors(layout).items():
        kind, _, rest = key.partition("|")
        if kind == _VALUE:
            features[rest] = array
        elif kind == _LIST:
            features[rest] = array.tolist()
        elif kind == _SHAPE:
            name, _, dtype = rest.rpartition("|")
            shape = tuple(int(n) for n in array.tolist())
            if min(shape, default=0) < 0 or np.prod(shape, dtype=np.float64) > MAX_STAND_IN_ELEMENTS:
                raise ValueError(f"image layout: {name} has an impossible shape {shape}")
            features[name] = np.broadcast_to(np.zeros((), dtype=np.dtype(dtype)), shape)
    return features


class _ImageProcessorTap:
    """Stands in for a processor's image processor: records what the real one returns, or replays a
    recorded layout without running it. Everything else is the real image processor's."""

    def __init__(self, real: Any, replay: dict[str, Any] | None) -> None:
        self._real = real
        self._replay = replay
        self.output: Any = None

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self._replay is None:
            output = self._real(images, *args, **kwargs)
            self.output = dict(output)  # as returned: processors pop entries from it afterwards
            return output
        from transformers import BatchFeature

        return BatchFeature(dict(self._replay))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def tapped(processor: Any, layout: bytes | None = None) -> tuple[Any, _ImageProcessorTap]:
    """A shallow copy of ``processor`` whose image processor records its output (``layout=None``) or
    replays ``layout``; the processor itself is left untouched (safe across threads)."""
    replay = None if layout is None else replay_features(layout)
    tap = _ImageProcessorTap(processor.image_processor, replay)
    copied = copy.copy(processor)
    copied.image_processor = tap
    return copied, tap


def stand_in_images(count: int) -> list[Image.Image]:
    """Images for a replayed layout: the processor counts them but never looks at their pixels."""
    return [Image.new("RGB", (1, 1)) for _ in range(count)]
