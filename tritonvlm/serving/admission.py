"""From a `vlm` request's inputs to what the engine takes: the prompt's token ids and the model
family's multimodal tensors, through the stateless `preprocess` and `vision_encoder` models.

The models are reached through a ``call(model_name, inputs, output_names)`` function (BLS inside
Triton; anything in a unit test), so this module knows nothing of Triton itself. Families that
preprocess and encode each image on its own take :mod:`tritonvlm.serving.per_image_admission`; the
others are looked up by their whole set of images here.
"""

from __future__ import annotations

import numpy as np

from tritonvlm import wire
from tritonvlm.families.base import Family
from tritonvlm.serving.image_cache import ImageCache, content_key, images_key
from tritonvlm.serving.model_calls import (
    ImageDigests,
    ModelCall,
    StageError,
    encode,
    encode_images,
    layout_refused,
    per_image_digests,
    prompt_ids,
)
from tritonvlm.serving.per_image_admission import per_image_inputs
from tritonvlm.wire import InvalidRequestError

__all__ = ["ImageDigests", "ModelCall", "StageError", "model_inputs"]
PROMPT_FORMS = (wire.MESSAGES, wire.PROMPT, wire.INPUT_IDS)


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

    With an enabled ``image_cache``, an image (a set of images, where the family cannot take them one
    by one) seen before is not encoded again (the returned arrays are then shared and read-only), and,
    sent as the same file(s), not decoded or processed either: `preprocess` then rebuilds the prompt
    from the images' recorded layout (``CACHED_LAYOUT``) instead of the files. A request adding an
    image to ones seen before has only the new one processed and encoded where the family allows it
    (``Family.per_image_preprocessing``). The family's multimodal tensors that depend on the prompt
    and pass through the encoder (``Family.prompt_mm_tensors``) are left out of the key, so that a
    later turn with the same images hits, and come from the request."""
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
    if use_cache and images is not None and family is not None and family.per_image_preprocessing:
        assert image_cache is not None
        return per_image_inputs(pre_inputs, images, call, image_cache, family)
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
            layout_refused(exc, image_cache, len(keys))  # (re-raises the client's own mistakes)
        else:
            ids = prompt_ids(pre)
            if len(keys) > 1:  # the images were kept apart (Family.split_images)
                assert family is not None
                return ids, family.join_images(encoded), per_image_digests(encoded, keys)
            own = wire.unpack_tensors(pre[wire.MM_INPUTS])
            return ids, {**encoded[0], **own}, whole_set_digests(ids, family, keys[0])
    if images is not None:
        pre_inputs[wire.IMAGES] = images
    pre = call(wire.PREPROCESS_MODEL, pre_inputs, [wire.INPUT_IDS, wire.MM_INPUTS, wire.IMAGE_LAYOUT])
    ids = prompt_ids(pre)
    packed = np.ascontiguousarray(pre[wire.MM_INPUTS], dtype=np.uint8).reshape(-1)
    if not packed.size:
        return ids, {}, None
    if not use_cache:
        key, _ = encoder_input_key(packed, prompt_tensors)
        return ids, encode(call, packed), whole_set_digests(ids, family, key)
    assert image_cache is not None
    layout = wire.array_bytes(pre.get(wire.IMAGE_LAYOUT, ()))
    parts = None
    if family is not None and not prompt_tensors:
        parts = family.split_images(wire.unpack_tensors(packed))
    if parts:  # each image its own entry (a set's files are still remembered as one)
        assert family is not None
        outputs, keys = encode_images(call, image_cache, family, parts)
        if files_key is not None and layout:
            image_cache.remember_files(files_key, keys, layout)
        return ids, family.join_images(outputs), per_image_digests(outputs, keys)
    image_key, own = encoder_input_key(packed, prompt_tensors)
    encoded = image_cache.get_or_compute(image_key, lambda: encode(call, packed))
    if files_key is not None and layout:
        image_cache.remember_files(files_key, [image_key], layout)
    return ids, {**encoded, **own}, whole_set_digests(ids, family, image_key)


def encoder_input_key(
    packed: np.ndarray, prompt_tensors: tuple[str, ...]
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The key of a request's packed encoder input without the family's prompt tensors (its images
    alone: the image cache's key, and the prefix cache's digest), and those prompt tensors."""
    if not prompt_tensors:
        return content_key(packed), {}
    tensors = wire.unpack_tensors(packed)
    own = {name: tensors.pop(name) for name in prompt_tensors if name in tensors}
    return content_key(wire.pack_array(tensors)), own


def whole_set_digests(ids: list[int], family: Family | None, image_key: bytes) -> ImageDigests:
    """One digest for all of a request's images over all placeholders: their key alone, not the
    family's prompt tensors (Llama 3.2 Vision's cross-attention mask has a row per prompt token, so
    hashing it would keep a prefix match from running past the image into another prompt; the rows
    of two prompts' shared tokens are the same wherever their images are)."""
    token = family.image_token_id if family is not None else None
    count = sum(1 for t in ids if t == token) if token is not None else 0
    return [(count, image_key)]
