"""The wire contract between the frontend, the Triton pipeline model `vlm` and the models behind it.

Everything that crosses a process boundary is named here once: tensor names, the JSON shapes carried
in BYTES tensors, and how a client's mistake is told apart from an internal failure.

`vlm` (decoupled, the entry point for any Triton client)
    inputs (exactly one of MESSAGES, PROMPT, INPUT_IDS)
      MESSAGES     BYTES [1]   JSON list of chat messages, OpenAI roles, with every image replaced by
                               a placeholder part ``{"type": "image"}``; images are numbered by order
                               of appearance across the whole conversation. The chat template applies.
      PROMPT       BYTES [1]   a raw text prompt, tokenized as is (no chat template, no images).
      INPUT_IDS    INT64 [-1]  a prompt already tokenized.
      IMAGES       BYTES [-1]  optional, with MESSAGES: the encoded image files (PNG, JPEG, ...) in order.
      PARAMETERS   BYTES [1]   optional: JSON object of sampling parameters (see SamplingParams keys);
                               ``guided`` holds an output constraint (tritonvlm.engine.grammar).
      TOOLS        BYTES [1]   optional, with MESSAGES: JSON list of OpenAI tools
                               (``{"type": "function", "function": {...}}``) for the chat template.
    outputs, one response per decode step, the last one flagged final
      TEXT_DELTA        BYTES [1]   the new text (may be empty)
      TOKEN_IDS         INT64 [-1]  the new token ids
      FINISH_REASON     BYTES [1]   "" while running, then "stop" or "length"
      PROMPT_TOKENS     INT32 [1]   prompt length, image placeholder tokens included
      COMPLETION_TOKENS INT32 [1]   tokens generated so far
      LOGPROBS          BYTES [1]   "" unless PARAMETERS asked for logprobs: then a JSON list, one
                                    OpenAI ``logprobs.content`` entry per token in TOKEN_IDS
      CACHED_TOKENS     INT32 [1]   prompt tokens taken from the prefix cache

A gRPC streaming client should send the request parameter ``triton_enable_empty_final_response=true``:
without it Triton drops a final response that carries no outputs (a cancelled or failed stream's
closing flag), and the client never sees the end of the stream.

`vlm` hosts the in-flight batching engine itself and calls the two stateless models below with BLS
(plain, non-decoupled requests). Their multimodal tensors are the model family's business, so they
travel as one packed dict per request (:func:`pack_array`):

`preprocess`   MESSAGES (+ IMAGES or CACHED_LAYOUT) or PROMPT → INPUT_IDS INT64 [-1], MM_INPUTS
               UINT8 [-1] (the processor's image tensors; no bytes without images), IMAGE_LAYOUT UINT8
               [-1] (the images as the processor saw them: tritonvlm.image_layout). Given
               CACHED_LAYOUT (UINT8 [-1], an IMAGE_LAYOUT of images seen before) instead of IMAGES,
               the prompt is built without the images, and MM_INPUTS holds only the family's
               prompt-dependent tensors. Families that process each image alone have one layout per
               image (image_layout.pack_image_layouts): CACHED_LAYOUT may then hold those of some
               images, whose IMAGES elements are empty; MM_INPUTS and IMAGE_LAYOUT are the others'.
`vision_encoder` (dynamic batching, ragged) MM_INPUTS UINT8 [-1] → MM_EMBEDS UINT8 [-1] (the image
               embeddings and whatever else the decoder needs, e.g. Qwen's image grids)
"""

from __future__ import annotations

import numpy as np

from tritonvlm import packing

# vlm inputs
MESSAGES = "MESSAGES"
PROMPT = "PROMPT"
IMAGES = "IMAGES"
PARAMETERS = "PARAMETERS"
TOOLS = "TOOLS"

# preprocess outputs / vision_encoder inputs and outputs
INPUT_IDS = "INPUT_IDS"
MM_INPUTS = "MM_INPUTS"
IMAGE_LAYOUT = "IMAGE_LAYOUT"
CACHED_LAYOUT = "CACHED_LAYOUT"
MM_EMBEDS = "MM_EMBEDS"

# streamed outputs of vlm
TEXT_DELTA = "TEXT_DELTA"
TOKEN_IDS = "TOKEN_IDS"
FINISH_REASON = "FINISH_REASON"
PROMPT_TOKENS = "PROMPT_TOKENS"
COMPLETION_TOKENS = "COMPLETION_TOKENS"
LOGPROBS = "LOGPROBS"
CACHED_TOKENS = "CACHED_TOKENS"
STREAM_OUTPUTS = (
    TEXT_DELTA,
    TOKEN_IDS,
    FINISH_REASON,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    LOGPROBS,
    CACHED_TOKENS,
)

# Model names in the repository.
VLM_MODEL = "vlm"
PREPROCESS_MODEL = "preprocess"
VISION_ENCODER_MODEL = "vision_encoder"

# Errors: a Triton model that rejects a request because of the client's input prefixes the message
# with this marker; the frontend maps such errors to HTTP 400, anything else to 500.
INVALID_REQUEST_MARKER = "[invalid_request]"


class InvalidRequestError(ValueError):
    """The client's request cannot be served (bad image, too long, bad parameter).

    ``param`` names the offending field where there is one, as in the OpenAI error body.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_wire(self) -> str:
        """The error message as a Triton model sends it."""
        suffix = f" (param: {self.param})" if self.param else ""
        return f"{INVALID_REQUEST_MARKER} {self.message}{suffix}"


def parse_wire_error(message: str) -> tuple[bool, str, str | None]:
    """Split an error message that came back from Triton.

    Returns ``(is_client_error, message, param)``: the marker and Triton's own prefixes are removed.
    """
    idx = message.find(INVALID_REQUEST_MARKER)
    if idx < 0:
        return False, message, None
    text = message[idx + len(INVALID_REQUEST_MARKER) :].strip()
    param = None
    if text.endswith(")") and " (param: " in text:
        text, _, tail = text.rpartition(" (param: ")
        param = tail[:-1]
    return True, text, param


def pack_tensors(tensors: dict[str, np.ndarray]) -> bytes:
    """A dict of numpy arrays as bytes (safetensors layout: :mod:`tritonvlm.packing`); ``b""`` for an
    empty dict."""
    return packing.pack(tensors).tobytes()


def bytes_array(data: bytes) -> np.ndarray:
    """Bytes as the UINT8 [-1] tensor they travel in (a view, no copy)."""
    return np.frombuffer(data, dtype=np.uint8)


def array_bytes(array: np.ndarray) -> bytes:
    """The bytes a UINT8 tensor (any shape) holds: :func:`bytes_array` undone."""
    return np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def pack_array(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """:func:`pack_tensors` as the UINT8 [-1] tensor it travels in (each array copied once, into it).

    Large binary payloads go as UINT8, not as one BYTES element: the Python backend serializes a BYTES
    tensor element by element with a length prefix and copies it again on the way out, which costs
    1.5-2x the time of a flat UINT8 tensor of the same size (measured with 1-5 MB payloads)."""
    return packing.pack(tensors)


def unpack_tensors(data: bytes | np.ndarray) -> dict[str, np.ndarray]:
    """The dict :func:`pack_tensors` packed, from its bytes or its UINT8 tensor (any shape), each array
    its own copy; empty for no bytes."""
    return packing.unpack(data)
