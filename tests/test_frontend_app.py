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
        self,
        messages: list[dict[str, Any]] | None,
        images: list[bytes],
        parameters: dict[str, Any],
        request_id: str,
        **prompt: Any,
    ) -> AsyncIterator[StreamDelta]:
        self.calls.append(
            {"messages": messages, "images": images, "parameters": parameters, "id": request_id, **prompt}
        )
        for delta in self.deltas:
            await asyncio.sleep(0)
            yield delta
        if self.error is not None:
            raise self.error


USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 0},
}

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
    assert data["usage"] == USAGE
    assert data["system_fingerprint"] == "tritonvlm-0.1.0"
    assert choice["logprobs"] is None
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
    assert usage_chunk["usage"] == USAGE
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
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=0)
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


def test_n_out_of_range() -> None:
    http, fake = make()
    with http:
        assert_error(http.post("/v1/chat/completions", json=body(n=0)), 400, "n")
        assert_error(http.post("/v1/chat/completions", json=body(n=129)), 400, "n")
        assert http.post("/v1/chat/completions", json=body(n=1)).status_code == 200
    assert len(fake.calls) == 1


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
        ("logit_bias", {"42": 10}),
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


# --------------------------------------------------------------------------- n, logprobs, fingerprint


def _lp(token: str, logprob: float, top: int = 0) -> dict[str, Any]:
    alternatives = [{"token": f"{token}{k}", "logprob": logprob - k - 1, "bytes": [65]} for k in range(top)]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alternatives}


LOGPROB_DELTAS = [
    StreamDelta("Hel", [1], None, 7, 1, [_lp("Hel", -0.5, 2)]),
    StreamDelta("", [2], None, 7, 2, [_lp("\ufffd", -1.0, 2)]),  # half a character: text held back
    StreamDelta("lo ü", [3], None, 7, 3, [_lp("lo ü", -1.5, 2)]),
    StreamDelta("", [4], "stop", 7, 4, [_lp("<eos>", -2.0, 2)]),
]


def test_n_fans_out_with_consecutive_seeds_and_sums_usage() -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/chat/completions", json=body(n=3, seed=10, temperature=1.0))
    assert r.status_code == 200, r.text
    data = r.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "Hello ü" for c in data["choices"])
    assert [c["parameters"]["seed"] for c in fake.calls] == [10, 11, 12]
    assert len({c["id"] for c in fake.calls}) == 3 and all(c["id"].startswith(data["id"]) for c in fake.calls)
    assert data["usage"]["prompt_tokens"] == 12  # the prompt is counted once
    assert data["usage"]["completion_tokens"] == 15 and data["usage"]["total_tokens"] == 27


def test_n_without_seed_sends_no_seed() -> None:
    http, fake = make()
    with http:
        assert http.post("/v1/chat/completions", json=body(n=2)).status_code == 200
    assert [c["parameters"] for c in fake.calls] == [{}, {}]


def test_n_streaming_chunks_carry_their_index() -> None:
    http, _ = make()
    with http:
        r = http.post(
            "/v1/chat/completions", json=body(n=2, stream=True, stream_options={"include_usage": True})
        )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-2]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hello ü"
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert sum(1 for c in mine if c["finish_reason"]) == 1
    assert events[-2]["usage"]["prompt_tokens"] == 12 and events[-2]["usage"]["completion_tokens"] == 10


def test_logprobs_non_stream_map_straight_into_content() -> None:
    http, fake = make(FakeClient(deltas=LOGPROB_DELTAS))
    with http:
        r = http.post("/v1/chat/completions", json=body(logprobs=True, top_logprobs=2))
    assert r.status_code == 200, r.text
    assert fake.calls[0]["parameters"] == {"logprobs": True, "top_logprobs": 2}
    choice = r.json()["choices"][0]
    assert choice["logprobs"] == {"content": [d.logprobs[0] for d in LOGPROB_DELTAS], "refusal": None}
    assert choice["finish_reason"] == "stop"


def test_logprobs_stream_chunks_carry_each_token() -> None:
    http, _ = make(FakeClient(deltas=LOGPROB_DELTAS))
    with http:
        r = http.post("/v1/chat/completions", json=body(logprobs=True, stream=True))
    chunks = sse_events(r.text)[:-1]
    entries = [
        e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert entries == [d.logprobs[0] for d in LOGPROB_DELTAS]
    # the held-back token still gets a chunk (empty content) so that no logprob is lost
    assert {"content": ""} in [c["choices"][0]["delta"] for c in chunks[1:]]


def test_logprobs_openai_sdk_types() -> None:
    http, _ = make(FakeClient(deltas=LOGPROB_DELTAS))
    with http:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        completion = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2
        )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [t.token for t in content] == ["Hel", "\ufffd", "lo ü", "<eos>"]
    assert content[0].top_logprobs[1].logprob == -2.5 and content[0].bytes == list(b"Hel")
    assert completion.system_fingerprint == "tritonvlm-0.1.0"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_logprobs_combinations(fields: dict[str, Any], param: str) -> None:
    http, fake = make()
    with http:
        assert_error(http.post("/v1/chat/completions", json=body(**fields)), 400, param)
    assert fake.calls == []


def test_triton_image_param_names_the_content_part() -> None:
    png = (
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ"
        "/pLvAAAAAElFTkSuQmCC"
    )
    fake = FakeClient(deltas=[], error=TritonRequestError(True, "image 0 is broken", "images[0]"))
    http, _ = make(fake)
    parts = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": png}}]
    with http:
        r = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": parts}]}
        )
    assert_error(r, 400, "messages[0].content[1].image_url.url")


# --------------------------------------------------------------------------- /v1/completions


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon", **fields}


def test_completion_text_prompt() -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/completions", json=completion_body())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["choices"] == [{"index": 0, "text": "Hello ü", "logprobs": None, "finish_reason": "length"}]
    assert data["usage"] == USAGE and data["system_fingerprint"] == "tritonvlm-0.1.0"
    (call,) = fake.calls
    assert call["messages"] is None and call["prompt"] == "Once upon" and "prompt_ids" not in call
    assert call["parameters"] == {"max_tokens": 16}  # OpenAI's default for completions


def test_completion_token_ids_and_batches() -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/completions", json=completion_body(prompt=[[1, 2, 3], [4, 5]], n=2, seed=3))
    assert r.status_code == 200, r.text
    data = r.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert [c["prompt_ids"] for c in fake.calls] == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    assert [c["parameters"]["seed"] for c in fake.calls] == [3, 4, 3, 4]
    assert data["usage"]["prompt_tokens"] == 24  # two prompts, each counted once
    assert data["usage"]["completion_tokens"] == 20


def test_completion_echo_and_legacy_logprobs() -> None:
    http, fake = make(FakeClient(deltas=LOGPROB_DELTAS))
    with http:
        echoed = http.post("/v1/completions", json=completion_body(echo=True)).json()
        scored = http.post("/v1/completions", json=completion_body(logprobs=2, max_tokens=4)).json()
    assert echoed["choices"][0]["text"] == "Once uponHello ü"
    assert fake.calls[1]["parameters"] == {"max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    logprobs = scored["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Hel", "\ufffd", "lo ü", "<eos>"]
    assert logprobs["token_logprobs"] == [-0.5, -1.0, -1.5, -2.0]
    assert logprobs["top_logprobs"][0] == {"Hel0": -1.5, "Hel1": -2.5}
    assert logprobs["text_offset"] == [0, 3, 3, 7]  # the held-back token starts where "lo ü" does


def test_completion_stream_with_echo_and_usage() -> None:
    http, _ = make()
    with http:
        r = http.post(
            "/v1/completions",
            json=completion_body(echo=True, stream=True, stream_options={"include_usage": True}),
        )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    texts = [e["choices"][0]["text"] for e in events[:-2]]
    assert texts == ["Once upon", "Hel", "lo ü", ""]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == USAGE


def test_completion_openai_sdk() -> None:
    http, _ = make()
    with http:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        completion = sdk.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3)
        assert completion.choices[0].text == "Hello ü" and completion.usage.prompt_tokens == 12  # type: ignore[union-attr]
        chunks = list(sdk.completions.create(model=MODEL, prompt="x", stream=True))
        assert "".join(c.choices[0].text for c in chunks) == "Hello ü"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"echo": True, "prompt": [1, 2]}, "echo"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt[1]"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [-1]}, "prompt[0]"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"n": 65, "prompt": ["a", "b"]}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"max_completion_tokens": 5}, "max_completion_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_completion_bad_requests(fields: dict[str, Any], param: str) -> None:
    http, fake = make()
    with http:
        assert_error(http.post("/v1/completions", json=completion_body(**fields)), 400, param)
    assert fake.calls == []


def test_completion_best_of_equal_to_n_and_empty_suffix_are_served() -> None:
    http, _ = make()
    with http:
        r = http.post("/v1/completions", json=completion_body(best_of=2, n=2, suffix=""))
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_completion_errors_name_the_prompt() -> None:
    fake = FakeClient(deltas=[], error=TritonRequestError(True, "the prompt is empty", "messages"))
    http, _ = make(fake)
    with http:
        assert_error(http.post("/v1/completions", json=completion_body()), 400, "prompt")
    http, _ = make(FakeClient(deltas=[], error=TritonUnavailableError("down")))
    with http:
        assert_error(http.post("/v1/completions", json=completion_body(stream=True)), 503)


def test_n_stream_error_in_one_choice_ends_the_stream_with_an_error_event() -> None:
    fake = FakeClient(deltas=DEFAULT_DELTAS[:2], error=TritonRequestError(False, "engine exploded"))
    http, _ = make(fake)
    with http:
        r = http.post("/v1/chat/completions", json=body(n=2, stream=True))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "inference_error"
    assert all("error" not in e for e in events[:-2])


def test_n_non_stream_error_is_the_http_error() -> None:
    fake = FakeClient(deltas=[], error=TritonRequestError(True, "too long", "max_tokens"))
    http, _ = make(fake)
    with http:
        assert_error(http.post("/v1/chat/completions", json=body(n=4)), 400, "max_tokens")
    assert len(fake.calls) == 4
