"""The OpenAI chat-completions and (legacy) completions schemas as pydantic models, in one place (like
vLLM's ``protocol.py``).

Requests are validated strictly: a field that OpenAI defines but this server does not implement is
refused with a 400 naming it (:data:`UNSUPPORTED_FIELDS`, :func:`find_unsupported_fields`) rather than
silently ignored, and so is a field OpenAI does not define at all. The pydantic ranges below name the
field in the error; the PARAMETERS built from a request are then checked once more by the engine's own
``SamplingParams.from_dict`` (see :func:`tritonvlm.frontend.conversion.check_parameters`), so a value
the engine would refuse never reaches Triton.

Types are strict, as OpenAI's API is: an integer field takes an integer (not ``"10"``, not ``10.0``), a
number field an integer or a finite float (not a string), a boolean field ``true``/``false``. Every
string must be encodable text (:data:`Text`: a lone UTF-16 surrogate such as ``"\\ud800"`` is refused
with a 400 naming the field, before it can reach a tokenizer). ``seed`` takes any signed or unsigned
64-bit integer, as OpenAI does.

Union members carry tags that are not Python identifiers (``"text-part"``, ``"content-parts"``...):
:func:`tritonvlm.frontend.errors.loc_to_param` drops them from error locations, so a validation error
names the field path the client wrote, e.g. ``messages[0].content[1].image_url``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
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

from tritonvlm.engine.sampling_params import (
    MAX_ABS_PENALTY,
    MAX_INT32,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MIN_REPETITION_PENALTY,
    MIN_SEED,
    MIN_TEMPERATURE,
)

# --------------------------------------------------------------------------- strict field types


def _encodable(value: str) -> str:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates, which JSON escapes can carry)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PydanticCustomError(
                "invalid_text",
                "the text is not valid Unicode: it holds a lone surrogate ({char}) at character {pos}",
                {"char": f"U+{ord(value[exc.start]):04X}", "pos": exc.start},
            ) from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]
"""A string that is valid Unicode (encodable as UTF-8)."""
StrictInteger = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A JSON number (an integer or a float), finite; strings and booleans are refused."""
Boolean = Annotated[bool, Field(strict=True)]


def _check_temperature(value: float | None) -> float | None:
    if value is not None and value != 0.0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise PydanticCustomError(
            "invalid_temperature",
            f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}",
        )
    return value


# --------------------------------------------------------------------------- request: messages


class ImageURL(BaseModel):
    """``image_url`` of a content part: an ``http(s)://``, ``data:`` or (when enabled) ``file://`` URL.

    ``detail`` (``auto``, ``low``, ``high``) is accepted and has no effect: every image is resized by
    the model's own processor limits (the preprocess model has no per-image resolution hint).
    """

    model_config = ConfigDict(extra="forbid")

    url: Text = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = "auto"


class TextContentPart(BaseModel):
    """``{"type": "text", "text": ...}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


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
    Annotated[Text, Tag("content-string")] | Annotated[list[ContentPart], Tag("content-parts")],
    Discriminator(
        _content_tag,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of content parts",
    ),
]

Role = Literal["system", "developer", "user", "assistant", "tool"]


class FunctionCall(BaseModel):
    """``function`` of a tool call: its name and its arguments as a JSON string."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call, in an assistant message (request or response)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of the conversation. ``tool`` messages answer an assistant's ``tool_calls``
    (``tool_call_id``); an assistant message with ``tool_calls`` may have no content."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: MessageContent | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1)  # OpenAI: [] is refused
    tool_call_id: str | None = None
    refusal: str | None = None  # accepted on assistant messages sent back; not rendered


# --------------------------------------------------------------------------- request: structured outputs


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (enforced by grammar)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    """``tools[].function``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """``tools[]``: a function the model may call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    """``tool_choice.function``."""

    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


def _tool_choice_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "choice-string"
    if isinstance(value, dict | NamedToolChoice):
        return "choice-object"
    return None


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("choice-string")]
    | Annotated[NamedToolChoice, Tag("choice-object")],
    Discriminator(
        _tool_choice_tag,
        custom_error_type="invalid_tool_choice",
        custom_error_message="tool_choice must be 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}",
    ),
]


# --------------------------------------------------------------------------- request: the body


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has an effect."""

    model_config = ConfigDict(extra="forbid")

    include_usage: Boolean | None = False
    include_obfuscation: Boolean | None = None  # accepted, no effect (we add no obfuscation field)


# Fields OpenAI defines for chat completions that this server does not implement. A request that sets
# one of them to anything but null/false (or the listed no-op value) is refused with a 400 naming it.
UNSUPPORTED_FIELDS: tuple[str, ...] = (
    "audio",
    "function_call",
    "functions",
    "logit_bias",
    "modalities",
    "prediction",
    "prompt_cache_retention",
    "reasoning_effort",
    "service_tier",
    "store",
    "verbosity",
    "web_search_options",
)

# The same for the legacy ``/v1/completions`` (``suffix``, ``echo`` and ``best_of`` are declared fields,
# checked in the app: some of their values are served).
UNSUPPORTED_COMPLETION_FIELDS: tuple[str, ...] = ("logit_bias",)

# The most choices one request may ask for (``n``, times the number of prompts for completions).
MAX_CHOICES = 128

# Values of unsupported fields that ask for exactly what the server does anyway.
_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
}


class SamplingFields(BaseModel):
    """The sampling fields chat and text completions share (ranges as the engine's SamplingParams)."""

    temperature: Annotated[Number | None, AfterValidator(_check_temperature)] = None
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInteger | None = Field(default=None, ge=-1, le=MAX_INT32)  # extension; 0 or -1: disabled
    seed: StrictInteger | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    presence_penalty: Number | None = Field(default=None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    frequency_penalty: Number | None = Field(default=None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    repetition_penalty: Number | None = Field(  # extension
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    ignore_eos: Boolean | None = None  # extension (benchmarks)

    stream: Boolean | None = False
    stream_options: StreamOptions | None = None
    n: StrictInteger | None = Field(default=1, ge=1, le=MAX_CHOICES)
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise PydanticCustomError("invalid_stop", "stop must be up to 4 non-empty strings")
        for stop in stops:
            _encodable(stop)
        return value

    @property
    def num_choices(self) -> int:
        """Choices per prompt (``n``)."""
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions`` body. ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are
    extensions (as in vLLM); ``user``, ``metadata``, ``safety_identifier`` and ``prompt_cache_key`` are
    accepted and have no effect. ``n`` choices are ``n`` engine requests (with a ``seed``, choice ``i``
    uses ``seed + i``)."""

    # "allow" keeps unknown keys in ``model_extra`` so find_unsupported_fields() can name them.
    model_config = ConfigDict(extra="allow")

    model: Text
    messages: list[ChatMessage] = Field(min_length=1)

    max_tokens: StrictInteger | None = Field(default=None, ge=1, le=MAX_INT32)
    max_completion_tokens: StrictInteger | None = Field(default=None, ge=1, le=MAX_INT32)
    logprobs: Boolean | None = None
    top_logprobs: StrictInteger | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    metadata: dict[Text, Text] | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None

    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0, le=MAX_INT32)]], Field(min_length=1)]


def _prompt_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        if not value:
            return "token-ids"  # min_length names the error
        first = value[0]
        if isinstance(first, str):
            return "texts"
        if isinstance(first, list | tuple):
            return "token-id-lists"
        return "token-ids"
    return None


PromptField = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[Text], Tag("texts")]
    | Annotated[TokenIds, Tag("token-ids")]
    | Annotated[list[TokenIds], Tag("token-id-lists")],
    Discriminator(
        _prompt_tag,
        custom_error_type="invalid_prompt",
        custom_error_message="prompt must be a string, a list of strings, a list of token ids "
        "or a list of token id lists",
    ),
]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` body (the legacy text completions API): a raw prompt, no chat template.

    ``prompt`` is a string or a list of token ids, or a list of either (one set of ``n`` choices per
    prompt). ``max_tokens`` defaults to 16 as in OpenAI's API. ``logprobs`` is an int (0-5: the
    chosen token's log probability plus that many alternatives). ``echo`` works for text prompts
    without ``logprobs``; ``best_of`` only when it equals ``n``; a non-empty ``suffix`` is refused.
    """

    model_config = ConfigDict(extra="allow")

    model: Text
    prompt: PromptField
    max_tokens: StrictInteger | None = Field(default=16, ge=1, le=MAX_INT32)
    logprobs: StrictInteger | None = Field(default=None, ge=0, le=5)
    echo: Boolean | None = False
    suffix: Text | None = None
    best_of: StrictInteger | None = Field(default=None, ge=1, le=MAX_CHOICES)

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request, each a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


def find_unsupported_fields(
    request: SamplingFields, unsupported: tuple[str, ...] = UNSUPPORTED_FIELDS
) -> list[tuple[str, str]]:
    """``(field, message)`` for each field of ``request`` this server refuses, in request order.

    Covers OpenAI fields that are not implemented (``unsupported``, by default :data:`UNSUPPORTED_FIELDS`)
    unless their value is null, false or a no-op, fields OpenAI does not define, and ``stream_options``
    without ``stream``.
    """
    problems: list[tuple[str, str]] = []
    for name, value in (request.model_extra or {}).items():
        if name in unsupported:
            if value is None or value is False or value in _NOOP_VALUES.get(name, ()):
                continue
            problems.append((name, f"'{name}' is not supported by this server"))
        else:
            problems.append((name, f"Unrecognized request argument supplied: {name}"))
    if request.stream_options is not None and not request.stream:
        problems.append(("stream_options", "'stream_options' is only allowed when 'stream' is true"))
    return problems


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    """``usage.prompt_tokens_details``: ``cached_tokens`` came from the engine's prefix cache."""

    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts; prompt tokens include the image placeholder tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        """Usage with ``total_tokens`` and ``prompt_tokens_details`` filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


FinishReason = Literal["stop", "length", "tool_calls"]

# One entry of ``logprobs.content``, exactly as the engine sends it in the LOGPROBS output:
# ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}``.
TokenLogprob = dict[str, Any]


class ChoiceLogprobs(BaseModel):
    """``choices[].logprobs`` of a chat completion (and of a chunk): one entry per generated token."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatCompletionMessage(BaseModel):
    """The assistant message of a non-streamed completion."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None  # left out of the JSON when there are none

    @model_serializer(mode="wrap")
    def _omit_no_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatCompletionChoice(BaseModel):
    """One choice of a non-streamed completion."""

    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


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
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's streamed form: index, id, type, function

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    """One choice of a chunk."""

    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class _UsageWhenSet(BaseModel):
    """``usage`` is written only when it was given (``null`` on the chunks of a stream that asked for
    usage, as OpenAI does; absent otherwise)."""

    usage: UsageInfo | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if "usage" not in self.model_fields_set:
            data.pop("usage", None)
        return data


class ChatCompletionChunk(_UsageWhenSet):
    """``object: "chat.completion.chunk"``: one SSE event of a streamed answer."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of the legacy completions API (parallel lists, one item per token)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice of a text completion (or of one of its stream chunks)."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(_UsageWhenSet):
    """``object: "text_completion"``: a whole text completion, or one SSE chunk of a streamed one
    (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None


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
