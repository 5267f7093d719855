"""What `vlm`'s admission shares between its paths: the models behind it reached through a call
function, the vision encoder's call, and the keys and digests of images."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import numpy as np

from tritonvlm import wire
from tritonvlm.families.base import IMAGE_EMBEDS, Family
from tritonvlm.serving.image_cache import ImageCache

log = logging.getLogger("tritonvlm.vlm")

# ``call(model_name, inputs, output_names) -> outputs``: BLS inside Triton, anything in a unit test.
ModelCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]
# Per image of a prompt, in order: its number of placeholder tokens and a digest of it.
ImageDigests = list[tuple[int, bytes]]


class StageError(Exception):
    """A model behind `vlm` answered with an error; its message goes to the client unchanged."""


def client_error(exc: StageError) -> bool:
    """Whether a stage's error is the client's own mistake (an error in the OpenAI shape)."""
    return bool(wire.parse_wire_error(str(exc))[0])


def layout_refused(exc: StageError, cache: ImageCache, found: int) -> None:
    """After `preprocess` failed to rebuild a prompt from image layouts: re-raise the client's own
    mistakes (the same answer as from the images); otherwise the processor does not suit the layout
    replay, and the caller serves the request from its images, as all requests from now on (the
    ``found`` entries its file lookups counted as hits are counted when it looks them up again)."""
    if client_error(exc):
        raise exc
    log.warning("preprocess could not rebuild a prompt from image layouts (%s); image files are "
                "preprocessed on every request from now on", exc)  # fmt: skip
    cache.stop_remembering_files(found)


def prompt_ids(pre: dict[str, np.ndarray]) -> list[int]:
    """The prompt token ids `preprocess` answered."""
    return np.asarray(pre[wire.INPUT_IDS]).reshape(-1).tolist()


def encode(call: ModelCall, packed: np.ndarray) -> dict[str, np.ndarray]:
    """The vision encoder's output for a packed encoder input (``MM_INPUTS`` bytes as UINT8)."""
    out = call(wire.VISION_ENCODER_MODEL, {wire.MM_INPUTS: packed.reshape(1, -1)}, [wire.MM_EMBEDS])
    return wire.unpack_tensors(out[wire.MM_EMBEDS])


def encode_images(
    call: ModelCall, cache: ImageCache, family: Family, parts: list[dict[str, np.ndarray]]
) -> tuple[list[dict[str, np.ndarray]], list[bytes]]:
    """Each image's encoder output and cache key, for the parts of ``Family.split_images``: held in
    ``cache``, or from one encoder call on the missing ones joined."""
    keys = [tensors_key(part) for part in parts]

    def encode_missing(indices: list[int]) -> list[dict[str, np.ndarray]]:
        chosen = [parts[i] for i in indices]
        return family.split_encoded(encode(call, wire.pack_array(family.join_images(chosen))), chosen)

    return (cache.get_or_compute_each(keys, encode_missing) if parts else []), keys


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
