"""From a validated OpenAI request to what the ``vlm`` model takes (see :mod:`tritonvlm.wire`).

Messages keep their role and content, except that every ``image_url`` part becomes the placeholder
``{"type": "image"}`` and its URL is collected (in order of appearance across the conversation, which
is how ``vlm`` numbers the images). ``developer`` messages are sent as ``system`` (the role OpenAI
renamed; chat templates know ``system``). PARAMETERS holds only the sampling fields the client set, so
the engine's defaults apply to the others, and is checked with the engine's own ``SamplingParams`` so
that what Triton would refuse is refused here, naming the field.
"""

from __future__ import annotations

from typing import Any

from tritonvlm.engine.sampling_params import SamplingParams, wrap_seed
from tritonvlm.frontend.errors import APIError
from tritonvlm.frontend.media import ImageRef
from tritonvlm.frontend.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ImageContentPart,
    SamplingFields,
)
from tritonvlm.frontend.tools import wire_tool_fields
from tritonvlm.wire import InvalidRequestError

_WIRE_ROLES = {"developer": "system"}
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def to_wire_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """The wire form of ``messages`` and the images they reference, in order.

    Images are accepted in ``user`` messages only (as OpenAI does); elsewhere they are a 400 naming
    the part.
    """
    wire_messages: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        role = _WIRE_ROLES.get(message.role, message.role)
        tool_fields = wire_tool_fields(message, i)
        if message.content is None and not tool_fields.get("tool_calls"):
            raise APIError(
                400,
                f"A {message.role} message needs 'content'.",
                param=f"messages[{i}].content",
                code="invalid_value",
            )
        if message.content is None or isinstance(message.content, str):
            wire_messages.append({"role": role, "content": message.content or "", **tool_fields})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if isinstance(part, ImageContentPart):
                param = f"messages[{i}].content[{j}]"
                if message.role != "user":
                    raise APIError(
                        400,
                        "Image content parts are only allowed in user messages, "
                        f"not in {message.role} messages.",
                        param=param,
                        code="invalid_value",
                    )
                images.append(ImageRef(url=part.image_url.url, param=f"{param}.image_url.url"))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        wire_messages.append({"role": role, "content": parts, **tool_fields})
    return wire_messages, images


def _sampling_candidates(request: SamplingFields) -> dict[str, Any]:
    top_k = request.top_k
    if top_k is not None and top_k < 0:
        top_k = 0  # -1 (vLLM's "disabled") is the engine's 0
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": top_k,
        "seed": request.seed,
        "stop": stop,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
        "ignore_eos": request.ignore_eos,
    }


def check_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Refuse (400 naming the field) what the engine's ``SamplingParams`` would refuse; return as is."""
    try:
        SamplingParams.from_dict(parameters)
    except InvalidRequestError as exc:
        raise APIError(400, exc.message, param=exc.param, code="invalid_value") from None
    return parameters


def build_parameters(request: ChatCompletionRequest) -> dict[str, Any]:
    """The PARAMETERS JSON object (keys of ``SamplingParams``); fields the client left out are omitted.

    Raises a 400 :class:`APIError` for a combination the engine refuses (``top_logprobs`` without
    ``logprobs``...).
    """
    max_tokens = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    candidates: dict[str, Any] = {"max_tokens": max_tokens, **_sampling_candidates(request)}
    if request.logprobs:
        candidates["logprobs"] = True
        candidates["top_logprobs"] = request.top_logprobs
    elif request.top_logprobs:
        candidates["top_logprobs"] = request.top_logprobs  # refused below: needs logprobs
    parameters = {key: value for key, value in candidates.items() if value is not None}
    return check_parameters(parameters)


def build_completion_parameters(request: CompletionRequest) -> dict[str, Any]:
    """PARAMETERS for a legacy completion: ``max_tokens`` defaults to 16, ``logprobs: k`` asks the engine
    for the chosen token's log probability and ``k`` alternatives."""
    candidates: dict[str, Any] = {
        "max_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS,
        **_sampling_candidates(request),
    }
    if request.logprobs is not None:
        candidates["logprobs"] = True
        candidates["top_logprobs"] = request.logprobs
    parameters = {key: value for key, value in candidates.items() if value is not None}
    return check_parameters(parameters)


def choice_parameters(parameters: dict[str, Any], index: int) -> dict[str, Any]:
    """The PARAMETERS of choice ``index`` of ``n``: with a seed, choice ``i`` samples with ``seed + i``
    (wrapped around within 64 bits)."""
    if index and parameters.get("seed") is not None:
        return {**parameters, "seed": wrap_seed(parameters["seed"] + index)}
    return parameters
