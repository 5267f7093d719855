"""`vlm`'s admission for families that preprocess and encode each image on its own
(``Family.per_image_preprocessing``): every image is looked up by its file, then by its encoder input.

A conversation re-sends its earlier images with every turn (the API is stateless). Here an image file
seen before, in whatever company, is neither decoded nor processed (`preprocess` replays its recorded
layout beside the new images, :mod:`tritonvlm.image_layout`) nor encoded (its embeddings are the image
cache's entry for it), and only the new images go through `preprocess`'s image processor and the
vision encoder, all of them in one encoder call. The joined tensors are those of the whole request.
"""

from __future__ import annotations

import numpy as np

from tritonvlm import wire
from tritonvlm.families.base import Family
from tritonvlm.image_layout import join_layouts, pack_image_layouts, unpack_image_layouts
from tritonvlm.serving.image_cache import ImageCache, Tensors, images_key
from tritonvlm.serving.model_calls import (
    ImageDigests,
    ModelCall,
    StageError,
    encode_images,
    layout_refused,
    per_image_digests,
    prompt_ids,
)

OUTPUTS = [wire.INPUT_IDS, wire.MM_INPUTS, wire.IMAGE_LAYOUT]


def per_image_inputs(
    pre_inputs: dict[str, np.ndarray],
    images: np.ndarray,
    call: ModelCall,
    cache: ImageCache,
    family: Family,
) -> tuple[list[int], dict[str, np.ndarray], ImageDigests]:
    """``(prompt ids, multimodal tensors, image digests)`` of a request with ``images`` (its files, a
    BYTES tensor) and the other `preprocess` inputs ``pre_inputs`` (see ``admission.model_inputs``)."""
    request = _Request(pre_inputs, images, call, cache, family)
    if request.known:
        try:
            return request.with_known_images()
        except StageError as exc:
            layout_refused(exc, cache, len(request.known))  # (re-raises the client's own mistakes)
            request.known = {}
    pre = call(wire.PREPROCESS_MODEL, {**pre_inputs, wire.IMAGES: images}, OUTPUTS)
    return request.encode_new(pre)


class _Request:
    """One request's images: their files, and those seen before (``known``: index -> embeddings,
    layout, cache key)."""

    def __init__(
        self,
        pre_inputs: dict[str, np.ndarray],
        images: np.ndarray,
        call: ModelCall,
        cache: ImageCache,
        family: Family,
    ) -> None:
        self.pre_inputs, self.call, self.cache, self.family = pre_inputs, call, cache, family
        self.files = [data if isinstance(data, bytes) else bytes(data) for data in images.reshape(-1)]
        self.file_keys = [images_key(np.array([data], dtype=np.object_)) for data in self.files]
        self.known: dict[int, tuple[Tensors, bytes, bytes]] = {}
        for i, file_key in enumerate(self.file_keys):
            found = cache.lookup_files(file_key)
            if found is not None:
                self.known[i] = (found[0][0], found[1], found[2][0])

    def with_known_images(self) -> tuple[list[int], dict[str, np.ndarray], ImageDigests]:
        count, known = len(self.files), self.known
        if len(known) == count:  # all seen: one layout of the set, nothing decoded or encoded
            layout = join_layouts([known[i][1] for i in range(count)])
            pre = self.call(
                wire.PREPROCESS_MODEL,
                {**self.pre_inputs, wire.CACHED_LAYOUT: wire.bytes_array(layout)},
                [wire.INPUT_IDS, wire.MM_INPUTS],
            )
            outputs = [known[i][0] for i in range(count)]
            keys = [known[i][2] for i in range(count)]
            return prompt_ids(pre), self.family.join_images(outputs), per_image_digests(outputs, keys)
        sent = np.array([b"" if i in known else data for i, data in enumerate(self.files)], dtype=np.object_)
        layouts = pack_image_layouts({i: layout for i, (_, layout, _) in known.items()})
        pre = self.call(
            wire.PREPROCESS_MODEL,
            {**self.pre_inputs, wire.IMAGES: sent, wire.CACHED_LAYOUT: wire.bytes_array(layouts)},
            OUTPUTS,
        )
        return self.encode_new(pre)

    def encode_new(self, pre: dict[str, np.ndarray]) -> tuple[list[int], dict[str, np.ndarray], ImageDigests]:
        """The processed new images' embeddings (from the cache, or one encoder call for those it
        lacks), joined in prompt order with the known images'; each new image's file is remembered."""
        family = self.family
        packed = wire.unpack_tensors(pre[wire.MM_INPUTS])
        parts = family.split_images(packed) if packed else []
        if parts is None:
            raise ValueError(f"{family.name}: preprocess output does not split per image")
        outputs, keys = encode_images(self.call, self.cache, family, parts)
        new = [i for i in range(len(self.files)) if i not in self.known]
        layouts = unpack_image_layouts(wire.array_bytes(pre.get(wire.IMAGE_LAYOUT, ()))) or {}
        if len(parts) != len(new):  # several parts per image (pan-and-scan crops): none were known
            joined = family.join_images(outputs) if outputs else {}
            return prompt_ids(pre), joined, per_image_digests(outputs, keys)
        for i, key in zip(new, keys, strict=True):
            if i in layouts:
                self.cache.remember_files(self.file_keys[i], [key], layouts[i])
        by_index = dict(zip(new, zip(outputs, keys, strict=True), strict=True))
        by_index.update({i: (tensors, key) for i, (tensors, _, key) in self.known.items()})
        ordered = [by_index[i] for i in range(len(self.files))]
        merged = [tensors for tensors, _ in ordered]
        return prompt_ids(pre), family.join_images(merged), per_image_digests(merged, [k for _, k in ordered])
