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

Families whose image processor treats each image on its own (``Family.per_image_preprocessing``: its
output for several images is each image's output concatenated along the first axis) get a layout per
image instead (:func:`pack_image_layouts`): the images of a request are then processed one by one
(:func:`tapped` with ``per_image``), images seen before are replayed from their own layouts while the
new ones are processed, and the layouts of images that came separately join into one
(:func:`join_layouts`).
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
_IMAGE = "image"  # key prefix of a layout per image (pack_image_layouts)


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


def pack_image_layouts(layouts: Mapping[int, bytes]) -> bytes:
    """Layouts of single images, by the image's index in its request, as one packed tensor dict."""
    return wire.pack_tensors(
        {f"{_IMAGE}|{i}": np.frombuffer(data, dtype=np.uint8) for i, data in layouts.items()}
    )


def unpack_image_layouts(data: bytes) -> dict[int, bytes] | None:
    """The per-image layouts of :func:`pack_image_layouts` (None: ``data`` is one layout of a set)."""
    tensors = wire.unpack_tensors(data)
    if not tensors or not all(key.startswith(f"{_IMAGE}|") for key in tensors):
        return None
    try:
        return {int(key.partition("|")[2]): array.tobytes() for key, array in tensors.items()}
    except ValueError:
        raise ValueError("image layouts: an image index is not a number") from None


def join_layouts(layouts: list[bytes]) -> bytes:
    """One layout of several images from their layouts (in order): counts add up, small values
    concatenate along the first axis, and pixel shapes add up along it (a tensor one image recorded
    by value and another by shape is recorded by shape)."""
    parts = [_entries(wire.unpack_tensors(layout)) for layout in layouts]
    if not parts or any(part.keys() != parts[0].keys() for part in parts):
        raise ValueError("image layouts of different kinds cannot be joined")
    packed: dict[str, np.ndarray] = {
        _COUNT: np.asarray([sum(p[_COUNT][1][0] for p in parts)], dtype=np.int64)
    }
    for name in parts[0]:
        if name == _COUNT:
            continue
        kinds = {p[name][0] for p in parts}
        arrays = [p[name][1] for p in parts]
        if kinds <= {_VALUE, _LIST}:
            joined = np.concatenate([np.asarray(a) for a in arrays])
            packed[f"{_LIST if kinds == {_LIST} else _VALUE}|{name}"] = joined
            continue
        shapes = [p[name][2] for p in parts]
        if any(shape[1:] != shapes[0][1:] for shape in shapes):
            raise ValueError(f"image layouts: {name} shapes {shapes} do not join")
        dtype = next(p[name][3] for p in parts if p[name][0] == _SHAPE)
        shape = (sum(shape[0] for shape in shapes), *shapes[0][1:])
        packed[f"{_SHAPE}|{name}|{dtype}"] = np.asarray(shape, dtype=np.int64)
    return wire.pack_tensors(packed)


def _entries(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray, tuple[int, ...], str]]:
    """A layout's entries by name: ``(kind, array, shape of the tensor, dtype)``."""
    out = {}
    for key, array in tensors.items():
        if key == _COUNT:
            out[key] = (_COUNT, array, (), "")
            continue
        kind, _, rest = key.partition("|")
        if kind == _SHAPE:
            name, _, dtype = rest.rpartition("|")
            out[name] = (kind, array, tuple(int(n) for n in array.tolist()), dtype)
        else:
            out[rest] = (kind, array, tuple(np.asarray(array).shape), np.asarray(array).dtype.str)
    return out


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
    recorded layout without running it; with ``per_image``, runs the real one on each image alone
    (replaying those in ``known``, by index) and returns the outputs concatenated. Everything else is
    the real image processor's."""

    def __init__(
        self,
        real: Any,
        replay: dict[str, Any] | None,
        per_image: bool = False,
        known: Mapping[int, dict[str, Any]] | None = None,
    ) -> None:
        self._real = real
        self._replay = replay
        self._per_image = per_image
        self._known = dict(known or {})
        self.output: Any = None
        self.outputs: dict[int, dict[str, Any]] = {}  # per_image: each processed image's own output

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        if self._replay is not None:
            return BatchFeature(dict(self._replay))
        if not self._per_image:
            output = self._real(images, *args, **kwargs)
            self.output = dict(output)  # as returned: processors pop entries from it afterwards
            return output
        nested = isinstance(images, list | tuple) and bool(images) and isinstance(images[0], list | tuple)
        flat = (
            [x for sub in images for x in sub]
            if nested
            else list(images)
            if isinstance(images, list | tuple)
            else [images]
        )
        each = []
        for i, image in enumerate(flat):
            if i in self._known:
                each.append(self._known[i])
                continue
            one = [[image]] if nested else [image]
            self.outputs[i] = dict(self._real(one, *args, **kwargs))
            each.append(self.outputs[i])
        if each and any(out.keys() != each[0].keys() for out in each):
            raise ValueError("the image processor's outputs differ in kind from image to image")
        joined = {
            name: np.concatenate([np.asarray(out[name]) for out in each])
            for name in (each[0] if each else {})
        }
        self.output = joined
        return BatchFeature(joined)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def tapped(
    processor: Any,
    layout: bytes | None = None,
    per_image: bool = False,
    known: Mapping[int, bytes] | None = None,
) -> tuple[Any, _ImageProcessorTap]:
    """A shallow copy of ``processor`` whose image processor records its output (``layout=None``) or
    replays ``layout``; with ``per_image``, it processes each image alone, replaying the images in
    ``known`` (index -> that image's layout). The processor itself is left untouched (safe across
    threads)."""
    replay = None if layout is None else replay_features(layout)
    replayed = {i: replay_features(data) for i, data in (known or {}).items()}
    # Joined with the processed images, the replayed stand-ins are materialized: bound them together.
    stand_ins = sum(
        int(np.prod(value.shape, dtype=np.float64))
        for features in replayed.values()
        for value in features.values()
        if isinstance(value, np.ndarray) and value.size > 1 and 0 in value.strides
    )
    if stand_ins > MAX_STAND_IN_ELEMENTS:
        raise ValueError(f"image layouts: {stand_ins} stand-in elements in all")
    tap = _ImageProcessorTap(processor.image_processor, replay, per_image, replayed)
    copied = copy.copy(processor)
    copied.image_processor = tap
    return copied, tap


def stand_in_images(count: int) -> list[Image.Image]:
    """Images for a replayed layout: the processor counts them but never looks at their pixels."""
    return [Image.new("RGB", (1, 1)) for _ in range(count)]
