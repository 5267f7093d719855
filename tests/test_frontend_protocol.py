"""Tests for the request schema, error locations, message conversion and parameter mapping."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tritonvlm.frontend.conversion import build_parameters, to_wire_messages
from tritonvlm.frontend.errors import APIError, loc_to_param, validation_error_to_api_error
from tritonvlm.frontend.media import ImageRef
from tritonvlm.frontend.protocol import (
    UNSUPPORTED_FIELDS,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    DeltaMessage,
    UsageInfo,
    find_unsupported_fields,
)


def req(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def validation_param(body: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = validation_error_to_api_error(info.value.errors())
    return error.param, error.message


IMG = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


# --------------------------------------------------------------------------- schema + error params


def user(content: Any) -> dict[str, Any]:
    """A one-message request body with this user content."""
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def plus(**fields: Any) -> dict[str, Any]:
    """A valid one-message request body with extra top-level fields."""
    return {**user("x"), **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        (user(5), "messages[0].content"),
        (user([{"type": "text", "text": "a"}, {"type": "image_url"}]), "messages[0].content[1].image_url"),
        (
            user([{"type": "image_url", "image_url": {"detail": "low"}}]),
            "messages[0].content[0].image_url.url",
        ),
        (
            user([{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]),
            "messages[0].content[0].image_url.detail",
        ),
        (user([{"type": "input_audio"}]), "messages[0].content[0]"),
        (user([{"type": "text"}]), "messages[0].content[0].text"),
        (
            {"model": "m", "messages": [{"role": "assistant", "content": "x", "function_call": {}}]},
            "messages[0].function_call",
        ),
        (plus(temperature=2.5), "temperature"),
        (plus(top_p=0), "top_p"),
        (plus(max_tokens=0), "max_tokens"),
        (plus(stop=5), "stop"),
        (plus(stop=["a", "b", "c", "d", "e"]), "stop"),
        (plus(n=0), "n"),
        (plus(n=129), "n"),
        (plus(top_logprobs=21), "top_logprobs"),
        (plus(top_logprobs=-1), "top_logprobs"),
        (plus(stream_options={"x": 1}), "stream_options.x"),
    ],
)
def test_validation_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    got, message = validation_param(body)
    assert got == param
    assert param in message


def test_n_error_message() -> None:
    _, message = validation_param({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0})
    assert "greater than or equal to 1" in message


def test_loc_to_param_drops_body_and_union_tags() -> None:
    loc = ("body", "messages", 0, "content", "content-parts", 1, "image_url-part", "image_url", "url")
    assert loc_to_param(loc) == "messages[0].content[1].image_url.url"
    assert loc_to_param(("body", "stop", "list[str]", 2)) == "stop[2]"
    assert loc_to_param(("body", "stop", "str")) == "stop"
    assert loc_to_param(("body",)) is None


def test_valid_request_shapes() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": [{"type": "text", "text": "really"}]},
                {
                    "role": "user",
                    "content": [IMG, {"type": "image_url", "image_url": {"url": "data:,", "detail": "high"}}],
                },
                {"role": "assistant", "content": "ok", "name": "bot"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u1",
            "n": 1,
        }
    )  # fmt: skip
    assert r.include_usage and len(r.messages) == 4


# --------------------------------------------------------------------------- unsupported fields


@pytest.mark.parametrize("name", UNSUPPORTED_FIELDS)
def test_each_unsupported_field_is_refused(name: str) -> None:
    problems = find_unsupported_fields(req(**{name: [{"x": 1}]}))
    assert problems == [(name, f"'{name}' is not supported by this server")]


@pytest.mark.parametrize(
    "fields",
    [
        {"logit_bias": None, "logprobs": False, "functions": False},
        {"modalities": ["text"], "service_tier": "auto", "store": False},
        {"user": "x", "metadata": {"a": "b"}, "safety_identifier": "s", "prompt_cache_key": "k"},
    ],
)
def test_noop_values_of_unsupported_fields_pass(fields: dict[str, Any]) -> None:
    assert find_unsupported_fields(req(**fields)) == []


def test_core_unsupported_fields_are_listed() -> None:
    for name in ("logit_bias", "audio", "modalities"):
        assert name in UNSUPPORTED_FIELDS
    for name in ("logprobs", "top_logprobs", "n", "tools", "tool_choice", "response_format"):  # served now
        assert name not in UNSUPPORTED_FIELDS


def test_unknown_fields_are_refused() -> None:
    assert find_unsupported_fields(req(frobnicate=1)) == [
        ("frobnicate", "Unrecognized request argument supplied: frobnicate")
    ]


def test_stream_options_need_stream() -> None:
    assert find_unsupported_fields(req(stream_options={"include_usage": True}))[0][0] == "stream_options"
    assert find_unsupported_fields(req(stream=True, stream_options={"include_usage": True})) == []


# --------------------------------------------------------------------------- message conversion


def test_string_content_is_kept() -> None:
    messages, images = to_wire_messages(req().messages)
    assert messages == [{"role": "user", "content": "hi"}] and images == []


def test_images_across_turns_become_placeholders_in_order() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "sys"},
                {"role": "user", "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": "https://a/1.png"}},
                    {"type": "text", "text": "with"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                        "detail": "low"}},
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": "they differ"}]},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/3.png"}}]},
            ],
        }
    )  # fmt: skip
    messages, images = to_wire_messages(r.messages)
    assert messages == [
        {"role": "system", "content": "sys"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "compare"},
                {"type": "image"},
                {"type": "text", "text": "with"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "they differ"}]},
        {"role": "user", "content": [{"type": "image"}]},
    ]
    assert images == [
        ImageRef("https://a/1.png", "messages[1].content[1].image_url.url"),
        ImageRef("data:image/png;base64,AAAA", "messages[1].content[3].image_url.url"),
        ImageRef("https://a/3.png", "messages[3].content[0].image_url.url"),
    ]


def test_images_outside_user_messages_are_refused() -> None:
    r = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "assistant", "content": [IMG]}]}
    )
    with pytest.raises(APIError) as info:
        to_wire_messages(r.messages)
    assert info.value.status_code == 400 and info.value.param == "messages[0].content[0]"


# --------------------------------------------------------------------------- parameters


def test_parameters_omit_unset_fields() -> None:
    assert build_parameters(req()) == {}


def test_parameters_mapping() -> None:
    r = req(
        max_tokens=10,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=7,
        stop="END",
        presence_penalty=0.1,
        frequency_penalty=-0.2,
        repetition_penalty=1.1,
        ignore_eos=True,
    )
    assert build_parameters(r) == {
        "max_tokens": 10,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "stop": ["END"],
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
    }


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert build_parameters(req(max_tokens=10, max_completion_tokens=3)) == {"max_tokens": 3}
    assert build_parameters(req(max_completion_tokens=4)) == {"max_tokens": 4}


def test_top_k_minus_one_means_disabled() -> None:
    assert build_parameters(req(top_k=-1)) == {"top_k": 0}


def test_logprobs_parameters() -> None:
    assert build_parameters(req(logprobs=True)) == {"logprobs": True}
    assert build_parameters(req(logprobs=True, top_logprobs=5)) == {"logprobs": True, "top_logprobs": 5}
    assert build_parameters(req(logprobs=False, top_logprobs=0)) == {}
    with pytest.raises(APIError) as info:
        build_parameters(req(top_logprobs=5))
    assert info.value.status_code == 400 and info.value.param == "top_logprobs"


def test_frontend_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, tritonvlm.frontend.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_temperature_zero_is_sent() -> None:
    assert build_parameters(req(temperature=0, stop=["a", "b"])) == {"temperature": 0.0, "stop": ["a", "b"]}


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0}, {"max_tokens": 1}, {"temperature": 0.0}, {"temperature": 2.0},
        {"temperature": 2.0001}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1e-6}, {"top_p": 1.0},
        {"top_p": 1.01}, {"top_k": -2}, {"top_k": -1}, {"top_k": 0}, {"top_k": 5},
        {"presence_penalty": 2.0}, {"presence_penalty": 2.1}, {"frequency_penalty": -2.0},
        {"frequency_penalty": -2.1}, {"repetition_penalty": 0.0}, {"repetition_penalty": 0.01},
        {"stop": ["a", "b", "c", "d"]}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""}, {"stop": [""]},
        {"seed": -5}, {"logprobs": True, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 21},
        {"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 0}, {"logprobs": True},
    ],
)  # fmt: skip
def test_ranges_agree_with_engine_sampling_params(fields: dict[str, Any]) -> None:
    """A request the frontend accepts must be accepted by the engine, and vice versa."""
    from tritonvlm.engine.sampling_params import SamplingParams
    from tritonvlm.wire import InvalidRequestError

    try:
        parameters = build_parameters(req(**fields))
    except (ValidationError, APIError):
        frontend_ok, parameters = False, {**fields}
    else:
        frontend_ok = True
    try:
        SamplingParams.from_dict(parameters)
        engine_ok = True
    except InvalidRequestError:
        engine_ok = False
    assert frontend_ok == engine_ok, (fields, frontend_ok, engine_ok)


# --------------------------------------------------------------------------- response serialisation


def test_chunk_json_shape() -> None:
    role = ChatCompletionChunk(
        id="c",
        model="m",
        choices=[ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))],
    ).model_dump()
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["choices"][0]["finish_reason"] is None and "usage" not in role
    last = ChatCompletionChunk(
        id="c",
        model="m",
        choices=[ChatCompletionChunkChoice(delta=DeltaMessage(), finish_reason="stop")],
        usage=None,
    ).model_dump()
    assert last["choices"][0]["delta"] == {} and last["usage"] is None
    usage = ChatCompletionChunk(id="c", model="m", choices=[], usage=UsageInfo.of(3, 4)).model_dump()
    assert usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
