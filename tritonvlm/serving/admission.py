"""From a `vlm` request's inputs to what the engine takes: the prompt's token ids and the model
family's multimodal tensors, through the stateless `preprocess` and `vision_encoder` models.

The models are reached through a ``call(model_name, inputs, output_names)`` function (BLS inside
Triton; anything in a unit test), so this module knows nothing of Triton itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import numpy as np

from tritonvlm import wire
from tritonvlm.families.base import IMAGE_EMBEDS, Family
from tritonvlm.serving.image_cache import ImageCache, content_key, images_key
from tritonvlm.wire import InvalidRequestError

log = logging.getLogger("tritonvlm.vlm")
ModelCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]
PROMPT_FORMS = (wire.MESSAGES, wire.PROMPT, wire.INPUT_IDS)


class StageError(Exception):
    """A model behind `vlm` answered with an error; its message goes to the client unchanged."""


ImageDigests = list[tuple[int, bytes]]


def model_inputs(
    given: dict[str, np.ndarray | None],
    call: ModelCall,
    image_cache: ImageCache | None = None,
    family: Family | None = None,
) -> tuple[list[int], dict[str, np.ndarray], ImageDigests | None]:
    """``(prompt token ids, multimodal tensors, image digests)`` for one request. ``given`` maps the
    `vlm` input names (MESSAGES, PROMPT, INPUT_IDS, IMAGES, TOOLS) to their arrays, or None where
    absent. The digests (None without images) are, per image in prompt order, its number of
    placeholder tokens and a digest of its encoder input, for the engine's prefix cache
    (``LLMEngine.add_request(image_digests=)``); where the ``family`` cannot split its images
    (``Family.split_images``), one digest of the whole set with the prompt's placeholder count.

    With an enabled ``image_cache``, an image (a set of images, where they cannot be split) seen
    before is not encoded again (the returned arrays are then shared and read-only); a request adding
    an image to ones seen before has only the new one encoded. The family's multimodal tensors that
    depend on the prompt and pass through the encoder (``Family.prompt_mm_tensors``) are left out of
    the key, so that a later turn with the same images hits, and come from the request. Image files
    seen before (the same bytes) skip preprocessing too: `preprocess` then rebuilds the prompt from
    the images' recorded layout (``CACHED_LAYOUT``) instead of the files."""
    forms = [name for name in PROMPT_FORMS if given.get(name) is not None]
    if len(forms) != 1:
        raise InvalidRequestError("send exactly one of MESSAGES, PROMPT or INPUT_IDS", "messages")
    images = given.get(wire.IMAGES)
    if forms[0] == wire.INPUT_IDS:
        if images is not None:
            raise InvalidRequestError("INPUT_IDS cannot carry images", "images")
        ids = np.asarray(given[wire.INPUT_IDS]).reshape(-1).astype(np.int64)
        return ids.tolist(), {}, None
    pre_inputs = {forms[0]: given[forms[0]]}
    if forms[0] == wire.MESSAGES and given.get(wire.TOOLS) is not None:
        pre_inputs[wire.TOOLS] = given[wire.TOOLS]  # for the chat template
    prompt_tensors = family.prompt_mm_tensors if family is not None else ()
    use_cache = image_cache is not None and image_cache.enabled
    files_key = images_key(images) if images is not None and use_cache else None
    known = image_cache.lookup_files(files_key) if files_key is not None else None
    if known is not None:  # these files were seen: no decoding, preprocessing or encoding
        encoded, layout, keys = known
        try:
            pre = call(
                wire.PREPROCESS_MODEL,
                {**pre_inputs, wire.CACHED_LAYOUT: wire.bytes_array(layout)},
                [wire.INPUT_IDS, wire.MM_INPUTS],
            )
        except StageError as exc:
            if wire.parse_wire_error(str(exc))[0]:
                raise  # the client's mistake: the same answer as from the images
            # A processor the layout replay does not suit: serve from the images, now and from now on.
            log.warning("preprocess could not rebuild a prompt from an image layout (%s); image files "
                        "are preprocessed on every request from now on", exc)  # fmt: skip
            image_cache.stop_remembering_files()
        else:
            ids = np.asarray(pre[wire.INPUT_IDS]).reshape(-1).tolist()
            own = wire.unpack_tensors(pre[wire.MM_INPUTS])
            if len(keys) > 1:  # (kept per image: a family that splits)
                assert family is not None
                return ids, family.join_images(encoded), per_image_digests(encoded, keys)
            return ids, {**encoded[0], **own}, whole_set_digests(ids, family, keys[0], own)
    if images is not None:
        pre_inputs[wire.IMAGES] = images
    pre = call(wire.PREPROCESS_MODEL, pre_inputs, [wire.INPUT_IDS, wire.MM_INPUTS, wire.IMAGE_LAYOUT])
    ids = np.asarray(pre[wire.INPUT_IDS]).reshape(-1).tolist()
    packed = np.ascontiguousarray(pre[wire.MM_INPUTS], dtype=np.uint8).reshape(-1)
    if not packed.size:
        return ids, {}, None

    def encode(packed: np.ndarray = packed) -> dict[str, np.ndarray]:
        enc = call(wire.VISION_ENCODER_MODEL, {wire.MM_INPUTS: packed[None]}, [wire.MM_EMBEDS])
        return wire.unpack_tensors(enc[wire.MM_EMBEDS])

    if not use_cache:
        return ids, encode(), whole_set_digests(ids, family, content_key(packed), {})
    assert image_cache is not None
    layout = wire.array_bytes(pre.get(wire.IMAGE_LAYOUT, ()))
    tensors = wire.unpack_tensors(packed)
    parts = family.split_images(tensors) if family is not None and not prompt_tensors else None
    if parts:
        assert family is not None
        keys = [tensors_key(part) for part in parts]

        def encode_each(indices: list[int]) -> list[dict[str, np.ndarray]]:
            chosen = [parts[i] for i in indices]
            return family.split_encoded(encode(wire.pack_array(family.join_images(chosen))), chosen)

        outputs = image_cache.get_or_compute_each(keys, encode_each)
        if files_key is not None and layout:
            image_cache.remember_files(files_key, keys, layout)
        return ids, family.join_images(outputs), per_image_digests(outputs, keys)
    own = {name: tensors.pop(name) for name in prompt_tensors if name in tensors}
    image_key = content_key(wire.pack_tensors(tensors)) if prompt_tensors else content_key(packed)
    encoded = image_cache.get_or_compute(image_key, encode)
    if files_key is not None and layout:
        image_cache.remember_files(files_key, [image_key], layout)
    return ids, {**encoded, **own}, whole_set_digests(ids, family, image_key, own)


def tensors_key(tensors: dict[str, np.ndarray]) -> bytes:
    """The cache key of one image's encoder input: its tensors' names, types, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.digest()


def per_image_digests(outputs: list[dict[str, np.ndarray]], keys: Sequence[bytes]) -> ImageDigests:
    """Each image's placeholder count (its embedding rows) and key."""
    return [(int(out[IMAGE_EMBEDS].shape[0]), key) for out, key in zip(outputs, keys, strict=True)]


def whole_set_digests(
    ids: list[int], family: Family | None, image_key: bytes, own: dict[str, np.ndarray]
) -> ImageDigests:
    """One digest for all of a request's images (and its own prompt tensors) over all placeholders."""
    token = family.image_token_id if family is not None else None
    count = sum(1 for t in ids if t == token) if token is not None else 0
    return [(count, mm_key(image_key, own))]


def mm_key(image_key: bytes, own: dict[str, np.ndarray]) -> bytes:
    """The key of a request's multimodal tensors: its images' cache key, and its own prompt tensors."""
    return image_key if not own else content_key(image_key + wire.pack_tensors(own))
