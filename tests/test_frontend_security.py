"""Tests for the API key and request body limit gates (ASGI middlewares) through the app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from test_frontend_app import MODEL, FakeClient, assert_error, body

from tritonvlm.frontend.app import FrontendSettings, create_app

KEY = "sk-test-0123456789"


def make(**settings: Any) -> tuple[TestClient, FakeClient]:
    fake = FakeClient()
    app = create_app(FrontendSettings(served_model_name=MODEL, **settings), client=fake)
    return TestClient(app, raise_server_exceptions=False), fake


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": KEY},
    ],
)
def test_missing_or_wrong_key_is_401(headers: dict[str, str]) -> None:
    http, fake = make(api_key=KEY)
    with http:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/nope")):
            r = http.request(method, path, json=body(), headers=headers)
            error = assert_error(r, 401, type_="invalid_request_error")
            assert error["code"] == "invalid_api_key" and error["param"] is None
            assert KEY not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
    assert fake.calls == []


def test_right_key_passes_and_health_stays_open() -> None:
    http, fake = make(api_key=KEY)
    with http:
        assert http.get("/health").status_code == 200
        ok = {"Authorization": f"Bearer {KEY}"}
        assert http.post("/v1/chat/completions", json=body(), headers=ok).status_code == 200
        assert http.get("/v1/models", headers={"authorization": f"bearer  {KEY} "}).status_code == 200
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http)
        assert [m.id for m in sdk.models.list()] == [MODEL]
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=http)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.code == "invalid_api_key"
    assert len(fake.calls) == 1


def test_no_key_configured_means_open() -> None:
    http, _ = make(api_key="")
    with http:
        assert http.get("/v1/models").status_code == 200


def test_declared_body_over_limit_is_413_without_reading() -> None:
    http, fake = make(max_request_body_bytes=1000)
    with http:
        r = http.post("/v1/chat/completions", json=body(user="x" * 2000))
        error = assert_error(r, 413, type_="invalid_request_error")
        assert error["code"] == "request_too_large" and "1000" in error["message"]
        assert http.post("/v1/chat/completions", json=body()).status_code == 200
    assert len(fake.calls) == 1


def test_chunked_body_over_limit_is_413_while_reading() -> None:
    http, fake = make(max_request_body_bytes=1000)
    payload = json.dumps(body(user="x" * 5000)).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 300):
            yield payload[i : i + 300]

    with http:
        r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert_error(r, 413)
        small = json.dumps(body()).encode()
        r = http.post(
            "/v1/chat/completions",
            content=iter([small[:10], small[10:]]),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text
    assert len(fake.calls) == 1


def test_body_limit_keeps_disconnect_detection() -> None:
    """After the middleware read the body, ``receive`` still reports the client's disconnect."""
    from tritonvlm.frontend.security import BodyLimitMiddleware

    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())

    async def run() -> None:
        messages = [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"cd", "more_body": False},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        scope = {"type": "http", "headers": [], "path": "/v1/x"}
        await BodyLimitMiddleware(app, 100)(scope, receive, None)

    asyncio.run(run())
    assert seen == [
        {"type": "http.request", "body": b"abcd", "more_body": False},
        {"type": "http.disconnect"},
    ]
