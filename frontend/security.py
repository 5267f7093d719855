"""Request gates that run before any route: the API key and the request body size limit.

Both are plain ASGI middlewares (like :mod:`tritonvlm.frontend.access_log`) that answer in the OpenAI
error shape. :class:`APIKeyMiddleware` refuses ``/v1/*`` requests without ``Authorization: Bearer
<key>`` (compared in constant time) with a 401; ``/health`` stays open. :class:`BodyLimitMiddleware`
answers 413 when the declared ``Content-Length`` is over the limit, or when the body read so far is
(a chunked body has no length), before the app parses anything; the body it read is handed on to the
app unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tritonvlm.frontend.errors import APIError


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _note(scope: Scope, outcome: str) -> None:
    scope.setdefault("state", {})["outcome"] = outcome


def _is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class APIKeyMiddleware:
    """401 for ``/v1/*`` requests whose ``Authorization`` is not ``Bearer <api_key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app = app
        self._expected = _digest(api_key.encode("utf-8"))

    def authorized(self, scope: Scope) -> tuple[bool, bool]:
        """``(authorized, key_given)`` for the request's ``Authorization`` header."""
        header = _header(scope, b"authorization")
        if header is None:
            return False, False
        scheme, _, token = header.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False, False
        # Equal-length digests compared in constant time: neither the key nor its length leaks.
        return hmac.compare_digest(_digest(token), self._expected), True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_api_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        ok, given = self.authorized(scope)
        if ok:
            await self.app(scope, receive, send)
            return
        if given:
            message = "Incorrect API key provided."
        else:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        error = APIError(401, message, type="invalid_request_error", code="invalid_api_key")
        _note(scope, "invalid API key" if given else "no API key")
        response = JSONResponse(error.to_body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def body_too_large(limit: int) -> APIError:
    """The 413 for a request body over ``limit`` bytes."""
    return APIError(
        413,
        f"The request body is too large: the limit is {limit} bytes.",
        type="invalid_request_error",
        code="request_too_large",
    )


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (declared or counted while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        _note(scope, "request body too large")
        await body_too_large(self.max_bytes).to_response()(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # http.disconnect: handed on, the app notices
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if len(messages) > 1 and all(m["type"] == "http.request" for m in messages):
            body = b"".join(m.get("body", b"") for m in messages)
            messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Any:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)
