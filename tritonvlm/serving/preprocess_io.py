"""The `preprocess` model's work on one request, from its input tensors to its output tensors, without
Triton: the model's adapter and the tests run the same code."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tritonvlm import wire
from tritonvlm.preprocessing import ChatPreprocessor
from tritonvlm.triton_utils import first_bytes, parse_json_input


def preprocess_outputs(
    preprocessor: ChatPreprocessor, inputs: Mapping[str, np.ndarray | None]
) -> dict[str, np.ndarray]:
    """INPUT_IDS, MM_INPUTS and IMAGE_LAYOUT for one request's PROMPT, or MESSAGES (+ TOOLS) with
    IMAGES or CACHED_LAYOUT (see :mod:`tritonvlm.wire`). Raises InvalidRequestError on the client's
    mistakes."""
    prompt, images_t = inputs.get(wire.PROMPT), inputs.get(wire.IMAGES)
    images = [bytes(x) for x in images_t.reshape(-1)] if images_t is not None else []
    if prompt is not None:
        if images or inputs.get(wire.CACHED_LAYOUT) is not None:
            raise wire.InvalidRequestError("a raw PROMPT cannot carry images", "images")
        out = preprocessor.encode_prompt(first_bytes(prompt).decode("utf-8", "replace"))
    else:
        messages, layout = inputs.get(wire.MESSAGES), inputs.get(wire.CACHED_LAYOUT)
        if messages is None:
            raise wire.InvalidRequestError("one of MESSAGES or PROMPT is required", "messages")
        out = preprocessor(
            parse_json_input(messages, None),
            images,
            parse_json_input(inputs.get(wire.TOOLS), None),
            layout=None if layout is None else wire.array_bytes(layout),
        )
    return {
        wire.INPUT_IDS: np.asarray(out.input_ids, dtype=np.int64),
        wire.MM_INPUTS: wire.pack_array(out.mm),
        wire.IMAGE_LAYOUT: wire.bytes_array(out.layout or b""),
    }
