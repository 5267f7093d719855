"""From a `vlm` request's inputs to what the engine takes: the prompt's token ids and the model
family's multimodal tensors, through the stateless `preprocess` and `vision_encoder` models.

The models are reached through a ``call(model_name, inputs, output_names)`` function (BLS inside
Triton; anything in a unit test), so this module knows nothing of Triton itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tritonvlm import wire
from tritonvlm.serving.image_cache import ImageCache, content_key
from tritonvlm.wire import InvalidRequestError

ModelCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]
PROMPT_FORMS = (wire.MESSAGES, wire.PROMPT, wire.INPUT_IDS)


class StageError(Exception):
    """A model behind `vlm` answered with an error; its message goes to the client unchanged."""


def model_inputs(
    given: dict[str, np.ndarray | None],
    call: ModelCall,
    image_cache: ImageCache | None = None,
    prompt_tensors: tuple[str, ...] = (),
) -> tuple[list[int], dict[str, np.ndarray], bytes | None]:
    """``(prompt token ids, multimodal tensors, their key)`` for one request. ``given`` maps the `vlm`
    input names (MESSAGES, PROMPT, INPUT_IDS, IMAGES, TOOLS) to their arrays, or None where absent.
    The key is a digest of the encoder's input (None without images): equal keys, equal tensors, so
    the engine's prefix cache can use it instead of hashing the tensors again. With an enabled
    ``image_cache``, an encoder input seen before is not encoded again (the returned arrays are then
    shared and read-only). ``prompt_tensors``: the family's multimodal tensors that depend on the
    prompt and pass through the encoder (``Family.prompt_mm_tensors``): the image cache keys on the
    other tensors, so a later turn with the same images hits, and these come from the request."""
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
    if images is not None:
        pre_inputs[wire.IMAGES] = images
    if forms[0] == wire.MESSAGES and given.get(wire.TOOLS) is not None:
        pre_inputs[wire.TOOLS] = given[wire.TOOLS]  # for the chat template
    pre = call(wire.PREPROCESS_MODEL, pre_inputs, [wire.INPUT_IDS, wire.MM_INPUTS])
    ids = np.asarray(pre[wire.INPUT_IDS]).reshape(-1).tolist()
    packed = np.ascontiguousarray(pre[wire.MM_INPUTS], dtype=np.uint8).reshape(-1)
    if not packed.size:
        return ids, {}, None

    def encode() -> dict[str, np.ndarray]:
        enc = call(wire.VISION_ENCODER_MODEL, {wire.MM_INPUTS: packed[None]}, [wire.MM_EMBEDS])
        return wire.unpack_tensors(enc[wire.MM_EMBEDS])

    key = content_key(packed)
    if image_cache is None or not image_cache.enabled:
        return ids, encode(), key
    if not prompt_tensors:
        return ids, image_cache.get_or_compute(key, encode), key
    tensors = wire.unpack_tensors(packed)
    own = {name: tensors.pop(name) for name in prompt_tensors if name in tensors}
    encoded = image_cache.get_or_compute(content_key(wire.pack_tensors(tensors)), encode)
    return ids, {**encoded, **own}, key
