"""The OpenAI chat-completions schema as pydantic models, in one place (like vLLM's ``protocol.py``).

Requests are validated strictly: a field that OpenAI defines but this server does not implement is
refused with a 400 naming it (:data:`UNSUPPORTED_FIELDS`, :func:`find_unsupported_fields`) rather than
silently ignored, and so is a field OpenAI does not define at all. Sampling ranges mirror
``tritonvlm.engine.sampling_params.SamplingParams.validate`` (which cannot be imported here without
pulling torch in), so a bad value is refused before any Triton call.

Union members carry tags that are not Python identifiers (``"text-part"``, ``"content-parts"``...):
:func:`tritonvlm.frontend.errors.loc_to_param` drops them from error locations, so a validation error
names the field path the client wrote, e.g. ``messages[0].content[1].image_url``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

# --------------------------------------------------------------------------- request: messages


class ImageURL(BaseModel):
    """``image_url`` of a content part: an ``http(s)://`` or ``data:`` URL and a detail hint."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = "auto"


class TextContentPart(BaseModel):
    """``{"type": "text", "text": ...}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImageContentPart(BaseModel):
    """``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


_PART_TAGS = {"text": "text-part", "image_url": "image_url-part"}


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _PART_TAGS.get(kind) if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextContentPart, Tag("text-part")] | Annotated[ImageContentPart, Tag("image_url-part")],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_content_part",
        custom_error_message="a content part must be an object with type 'text' or 'image_url'",
    ),
]


def _content_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "content-string"
    if isinstance(value, list | tuple):
        return "content-parts"
    return None


MessageContent = Annotated[
    Annotated[str, Tag("content-string")] | Annotated[list[ContentPart], Tag("content-parts")],
    Discriminator(
        _content_tag,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]

Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(BaseModel):
    """One message of the conversation. Tool and function messages/fields are not supported."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: MessageContent
    name: str | None = None


# --------------------------------------------------------------------------- request: the body


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has an effect."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # accepted, no effect (we add no obfuscation field)


# Fields OpenAI defines for chat completions that this server does not implement. A request that sets
# one of them to anything but null/false (or the listed no-op value) is refused with a 400 naming it.
UNSUPPORTED_FIELDS: tuple[str, ...] = (
    "audio",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "modalities",
    "parallel_tool_calls",
    "prediction",
    "prompt_cache_retention",
    "reasoning_effort",
    "response_format",
    "service_tier",
    "store",
    "tool_choice",
    "tools",
    "top_logprobs",
    "verbosity",
    "web_search_options",
)

# Values of unsupported fields that ask for exactly what the server does anyway.
_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "response_format": ({"type": "text"},),
    "service_tier": ("auto", "default"),
}


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body. ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are
    extensions (as in vLLM); ``user``, ``metadata``, ``safety_identifier`` and ``prompt_cache_key`` are
    accepted and have no effect."""

    # "allow" keeps unknown keys in ``model_extra`` so find_unsupported_fields() can name them.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)

    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # extension; 0 or -1: disabled
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)  # extension
    ignore_eos: bool | None = None  # extension (benchmarks)

    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1

    user: str | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise PydanticCustomError("invalid_stop", "stop must be up to 4 non-empty strings")
        return value

    @field_validator("n")
    @classmethod
    def _check_n(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise PydanticCustomError("unsupported_n", "only n=1 is supported")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def find_unsupported_fields(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """``(field, message)`` for each field of ``request`` this server refuses, in request order.

    Covers OpenAI fields that are not implemented (:data:`UNSUPPORTED_FIELDS`) unless their value is
    null, false or a no-op, fields OpenAI does not define, and ``stream_options`` without ``stream``.
    """
    problems: list[tuple[str, str]] = []
    for name, value in (request.model_extra or {}).items():
        if name in UNSUPPORTED_FIELDS:
            if value is None or value is False or value in _NOOP_VALUES.get(name, ()):
                continue
            problems.append((name, f"'{name}' is not supported by this server"))
        else:
            problems.append((name, f"Unrecognized request argument supplied: {name}"))
    if request.stream_options is not None and not request.stream:
        problems.append(("stream_options", "'stream_options' is only allowed when 'stream' is true"))
    return problems


# --------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    """Token counts; prompt tokens include the image placeholder tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        """Usage with ``total_tokens`` filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length"]


class ChatCompletionMessage(BaseModel):
    """The assistant message of a non-streamed completion."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    """One choice of a non-streamed completion."""

    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


def _now() -> int:
    return int(time.time())


class ChatCompletion(BaseModel):
    """``object: "chat.completion"``: the whole answer at once."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """The ``delta`` of a chunk; ``None`` fields are left out of the JSON (the last delta is ``{}``)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    """One choice of a chunk."""

    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """``object: "chat.completion.chunk"``: one SSE event of a streamed answer.

    ``usage`` is written only when it was given (``null`` on the chunks of a stream that asked for
    usage, as OpenAI does; absent otherwise).
    """

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if "usage" not in self.model_fields_set:
            data.pop("usage", None)
        return data


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tritonvlm"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The ``error`` object of an OpenAI error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo
