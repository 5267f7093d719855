"""Tests for the FastAPI app with a fake Triton client (no Triton): routes, streaming, errors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from tritonvlm.frontend.app import FrontendSettings, create_app
from tritonvlm.frontend.triton_client import StreamDelta, TritonRequestError, TritonUnavailableError

MODEL = "test-vlm"


class FakeClient:
    """Stands in for TritonVLMClient: records calls, yields scripted deltas, then raises ``error``."""

    def __init__(
        self, deltas: list[StreamDelta] | None = None, error: BaseException | None = None, ready: bool = True
    ) -> None:
        self.deltas = deltas if deltas is not None else DEFAULT_DELTAS
        self.error = error
        self.ready = ready
        self.calls: list[dict[str, Any]] = []

    async def is_ready(self) -> bool:
        return self.ready

    async def stream(
        self, messages: list[dict[str, Any]], images: list[bytes], parameters: dict[str, Any], request_id: str
    ) -> AsyncIterator[StreamDelta]:
        self.calls.append(
            {"messages": messages, "images": images, "parameters": parameters, "id": request_id}
        )
        for delta in self.deltas:
            await asyncio.sleep(0)
            yield delta
        if self.error is not None:
            raise self.error


DEFAULT_DELTAS = [
    StreamDelta("Hel", [1, 2], None, 12, 2),
    StreamDelta("", [3], None, 12, 3),  # a step that completes no printable text
    StreamDelta("lo ü", [4], None, 12, 4),
    StreamDelta("", [5], "length", 12, 5),
]


def make(client: FakeClient | None = None, **settings: Any) -> tuple[TestClient, FakeClient]:
    fake = client or FakeClient()
    app = create_app(FrontendSettings(served_model_name=MODEL, **settings), client=fake)
    return TestClient(app, raise_server_exceptions=False), fake


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], **fields}


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(
    response: Any, status: int, param: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if type_ is not None:
        assert error["type"] == type_
    return error


# --------------------------------------------------------------------------- non-stream


def test_non_stream_aggregates_deltas() -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/chat/completions", json=body(max_tokens=5))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == MODEL
    assert data["id"].startswith("chatcmpl-") and data["id"] == fake.calls[0]["id"]
    assert r.headers["x-request-id"] == data["id"]
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello ü", "refusal": None}
    assert choice["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert fake.calls[0]["parameters"] == {"max_tokens": 5}
    assert fake.calls[0]["messages"] == [{"role": "user", "content": "Say hello"}]
    assert fake.calls[0]["images"] == []


def test_request_ids_are_unique() -> None:
    http, fake = make()
    with http:
        ids = {http.post("/v1/chat/completions", json=body()).json()["id"] for _ in range(3)}
    assert len(ids) == 3 and {c["id"] for c in fake.calls} == ids


def test_parameters_and_messages_reach_the_client() -> None:
    http, fake = make()
    with http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "terse"},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    },
                ],
                "max_completion_tokens": 9,
                "max_tokens": 100,
                "temperature": 0,
                "top_k": 3,
                "seed": 1,
                "stop": ["x"],
                "repetition_penalty": 1.2,
                "user": "someone",
            },
        )
    assert r.status_code == 200, r.text
    call = fake.calls[0]
    assert call["parameters"] == {
        "max_tokens": 9,
        "temperature": 0.0,
        "top_k": 3,
        "seed": 1,
        "stop": ["x"],
        "repetition_penalty": 1.2,
    }
    assert call["messages"] == [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]


# --------------------------------------------------------------------------- stream


def test_stream_chunk_sequence() -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/chat/completions", json=body(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {fake.calls[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert all("usage" not in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo ü"}, {}]
    assert reasons == [None, None, None, "length"]


def test_stream_include_usage() -> None:
    http, _ = make()
    with http:
        r = http.post("/v1/chat/completions", json=body(stream=True, stream_options={"include_usage": True}))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert all(c["usage"] is None for c in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_stream_error_after_start_is_an_sse_event() -> None:
    fake = FakeClient(deltas=DEFAULT_DELTAS[:1], error=TritonRequestError(False, "engine exploded"))
    http, _ = make(fake)
    with http:
        r = http.post("/v1/chat/completions", json=body(stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {
            "message": "engine exploded",
            "type": "server_error",
            "param": None,
            "code": "inference_error",
        }
    }
    assert events[1]["choices"][0]["delta"] == {"content": "Hel"}


def test_stream_error_before_first_delta_is_an_http_error() -> None:
    fake = FakeClient(deltas=[], error=TritonRequestError(True, "prompt is too long", "messages"))
    http, _ = make(fake)
    with http:
        r = http.post("/v1/chat/completions", json=body(stream=True))
    error = assert_error(r, 400, "messages", "invalid_request_error")
    assert error["message"] == "prompt is too long"


def test_openai_sdk_parses_responses() -> None:
    http, _ = make()
    with http:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        completion = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "Hello ü"
        assert completion.usage is not None and completion.usage.total_tokens == 17
        stream = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello ü"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
        assert info.value.body["param"] == "n"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        assert [m.id for m in sdk.models.list()] == [MODEL]


# --------------------------------------------------------------------------- Triton errors


@pytest.mark.parametrize("stream", [False, True])
def test_triton_client_error_is_400_with_param(stream: bool) -> None:
    fake = FakeClient(deltas=[], error=TritonRequestError(True, "image 1 is not an image", "images[0]"))
    http, _ = make(fake)
    with http:
        r = http.post("/v1/chat/completions", json=body(stream=stream))
    error = assert_error(r, 400, "images[0]", "invalid_request_error")
    assert error["message"] == "image 1 is not an image"


def test_triton_internal_error_is_500_with_message() -> None:
    http, _ = make(FakeClient(deltas=[], error=TritonRequestError(False, "CUDA out of memory")))
    with http:
        r = http.post("/v1/chat/completions", json=body())
    error = assert_error(r, 500, type_="server_error")
    assert error["message"] == "CUDA out of memory"


@pytest.mark.parametrize("stream", [False, True])
def test_triton_unavailable_is_503(stream: bool) -> None:
    http, _ = make(FakeClient(deltas=[], error=TritonUnavailableError("connection refused")))
    with http:
        r = http.post("/v1/chat/completions", json=body(stream=stream))
    assert_error(r, 503, type_="server_error")


def test_unexpected_error_is_500_without_details(caplog: pytest.LogCaptureFixture) -> None:
    http, _ = make(FakeClient(deltas=[], error=RuntimeError("secret internal detail 1234")))
    with caplog.at_level(logging.ERROR, logger="tritonvlm.frontend"), http:
        r = http.post("/v1/chat/completions", json=body())
    error = assert_error(r, 500, type_="server_error")
    assert "secret" not in r.text and "Traceback" not in r.text
    assert error["code"] == "internal_error"
    assert "secret internal detail 1234" in caplog.text  # ... but it is logged


# --------------------------------------------------------------------------- request errors


def test_malformed_json() -> None:
    http, fake = make()
    with http:
        r = http.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"},
        )
    error = assert_error(r, 400, type_="invalid_request_error")
    assert error["param"] is None and "JSON" in error["message"]
    assert fake.calls == []


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b"null"])
def test_body_must_be_an_object(payload: bytes) -> None:
    http, _ = make()
    with http:
        r = http.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
    assert_error(r, 400, type_="invalid_request_error")


def test_validation_error_names_param() -> None:
    http, _ = make()
    bad = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}],
    }
    with http:
        r = http.post("/v1/chat/completions", json=bad)
    error = assert_error(r, 400, "messages[0].content[1].image_url", "invalid_request_error")
    assert "messages[0].content[1].image_url" in error["message"]


def test_n_other_than_one() -> None:
    http, _ = make()
    with http:
        assert_error(http.post("/v1/chat/completions", json=body(n=2)), 400, "n")
        assert http.post("/v1/chat/completions", json=body(n=1)).status_code == 200


def test_unknown_model_is_404() -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/chat/completions", json={**body(), "model": "gpt-4o"})
    error = assert_error(r, 404, "model")
    assert error["code"] == "model_not_found" and "gpt-4o" in error["message"]
    assert fake.calls == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"42": 10}),
        ("logprobs", True),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("made_up_field", 1),
    ],
)
def test_unsupported_field_is_400_naming_it(field: str, value: Any) -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/chat/completions", json=body(**{field: value}))
    error = assert_error(r, 400, field, "invalid_request_error")
    assert field in error["message"]
    assert fake.calls == []


def test_image_in_assistant_message_is_refused() -> None:
    http, _ = make()
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [img]}],
            },
        )
    assert_error(r, 400, "messages[1].content[0]")


# --------------------------------------------------------------------------- other routes


def test_health() -> None:
    http, fake = make()
    with http:
        r = http.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        fake.ready = False
        assert_error(http.get("/health"), 503, type_="server_error")


def test_models() -> None:
    http, _ = make()
    with http:
        r = http.get("/v1/models")
        assert r.status_code == 200
        data = r.json()
        assert data["object"] == "list"
        assert [(m["id"], m["object"]) for m in data["data"]] == [(MODEL, "model")]
        assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        assert_error(http.get("/v1/models/nope"), 404, "model")


def test_unknown_route_and_method_use_error_shape() -> None:
    http, _ = make()
    with http:
        assert_error(http.get("/v1/nothing"), 404)
        assert_error(http.get("/v1/chat/completions"), 405)


def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    http, _ = make()
    with caplog.at_level(logging.INFO, logger="tritonvlm.frontend.access"), http:
        r = http.post("/v1/chat/completions", json=body())
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tritonvlm.frontend.access"]
    assert len(lines) == 1
    assert "POST /v1/chat/completions 200" in lines[0] and r.json()["id"] in lines[0] and "ms" in lines[0]
