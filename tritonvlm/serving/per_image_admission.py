"""`vlm`'s admission for families that preprocess and encode each image on its own
(``Family.per_image_preprocessing``): every image is looked up by its file, then by its encoder input.

A conversation re-sends its earlier images with every turn (the API is stateless). Here an image file
seen before, in whatever company, is neither decoded nor processed (`preprocess` replays its recorded
layout beside the new images, :mod:`tritonvlm.image_layout`) nor encoded (its embeddings are the image
cache's entry for it), and only the new images go through `preprocess`'s image processor and the
vision encoder, all of them in one encoder call. The joined tensors are those of the whole request.
"""

from __future__ import annotations

import logging

import numpy as np

from tritonvlm import wire
from tritonvlm.families.base import Family
from tritonvlm.image_layout import join_layouts, pack_image_layouts, unpack_image_layouts
from tritonvlm.serving.image_cache import ImageCache, Tensors, images_key
from tritonvlm.serving.model_calls import (
    ImageDigests,
    ModelCall,
    StageError,
    client_error,
    encode,
    per_image_digests,
    prompt_ids,
    tensors_key,
)

log = logging.getLogger("tritonvlm.vlm")
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
    files = [data if isinstance(data, bytes) else bytes(data) for data in images.reshape(-1)]
    file_keys = [images_key(np.array([data], dtype=object)) for data in files]
    known: dict[int, tuple[Tensors, bytes, bytes]] = {}  # index -> (embeddings, layout, key)
    for i, file_key in enumerate(file_keys):
        found = cache.lookup_files(file_key)
        if found is not None:
            known[i] = (found[0][0], found[1], found[2][0])
    if known:
        try:
            return _with_known_images(pre_inputs, files, file_keys, known, call, cache, family)
        except StageError as exc:
            if client_error(exc):
                raise  # the client's mistake: the same answer as from the images
            # A processor the layout replay does not suit: serve from the images, now and from now on.
            log.warning("preprocess could not rebuild a prompt from image layouts (%s); image files "
                        "are preprocessed on every request from now on", exc)  # fmt: skip
            cache.stop_remembering_files()
    pre = call(wire.PREPROCESS_MODEL, {**pre_inputs, wire.IMAGES: images}, OUTPUTS)
    return _encode_new(pre, file_keys, {}, call, cache, family)


def _with_known_images(
    pre_inputs: dict[str, np.ndarray],
    files: list[bytes],
    file_keys: list[bytes],
    known: dict[int, tuple[Tensors, bytes, bytes]],
    call: ModelCall,
    cache: ImageCache,
    family: Family,
) -> tuple[list[int], dict[str, np.ndarray], ImageDigests]:
    if len(known) == len(files):  # all seen: one layout of the set, nothing decoded or encoded
        layout = join_layouts([known[i][1] for i in range(len(files))])
        pre = call(
            wire.PREPROCESS_MODEL,
            {**pre_inputs, wire.CACHED_LAYOUT: wire.bytes_array(layout)},
            [wire.INPUT_IDS, wire.MM_INPUTS],
        )
        outputs = [known[i][0] for i in range(len(files))]
        keys = [known[i][2] for i in range(len(files))]
        return prompt_ids(pre), family.join_images(outputs), per_image_digests(outputs, keys)
    sent = np.array([b"" if i in known else data for i, data in enumerate(files)], dtype=np.object_)
    layouts = pack_image_layouts({i: layout for i, (_, layout, _) in known.items()})
    pre = call(
        wire.PREPROCESS_MODEL,
        {**pre_inputs, wire.IMAGES: sent, wire.CACHED_LAYOUT: wire.bytes_array(layouts)},
        OUTPUTS,
    )
    return _encode_new(pre, file_keys, known, call, cache, family)


def _encode_new(
    pre: dict[str, np.ndarray],
    file_keys: list[bytes],
    known: dict[int, tuple[Tensors, bytes, bytes]],
    call: ModelCall,
    cache: ImageCache,
    family: Family,
) -> tuple[list[int], dict[str, np.ndarray], ImageDigests]:
    """The processed new images' embeddings (from the cache, or one encoder call for those it lacks),
    joined in prompt order with the known images'; each new image's file is remembered."""
    packed = wire.unpack_tensors(pre[wire.MM_INPUTS])
    parts = family.split_images(packed) if packed else []
    if parts is None:
        raise ValueError(f"{family.name}: preprocess output does not split per image")
    keys = [tensors_key(part) for part in parts]

    def encode_each(indices: list[int]) -> list[Tensors]:
        chosen = [parts[i] for i in indices]
        return family.split_encoded(encode(call, wire.pack_array(family.join_images(chosen))), chosen)

    outputs = cache.get_or_compute_each(keys, encode_each) if parts else []
    new = [i for i in range(len(file_keys)) if i not in known]
    layouts = unpack_image_layouts(wire.array_bytes(pre.get(wire.IMAGE_LAYOUT, ()))) or {}
    if len(parts) != len(new):  # several parts per image (pan-and-scan crops): none were known
        joined = family.join_images(outputs) if outputs else {}
        return prompt_ids(pre), joined, per_image_digests(outputs, keys)
    for i, key in zip(new, keys, strict=True):
        if i in layouts:
            cache.remember_files(file_keys[i], [key], layouts[i])
    by_index = dict(zip(new, zip(outputs, keys, strict=True), strict=True))
    by_index.update({i: (tensors, key) for i, (tensors, _, key) in known.items()})
    ordered = [by_index[i] for i in range(len(file_keys))]
    merged = [tensors for tensors, _ in ordered]
    return prompt_ids(pre), family.join_images(merged), per_image_digests(merged, [k for _, k in ordered])
