"""One log line per HTTP request: method, path, status, latency and request id.

A plain ASGI middleware (not ``BaseHTTPMiddleware``, which would get in the way of streaming and
disconnect detection). It gives each request an id (``chatcmpl-<uuid hex>`` for chat completions,
``cmpl-<uuid hex>`` for text completions, ``req-<uuid hex>`` otherwise), stores it in
``request.state.request_id`` for the handlers, and returns it in the ``x-request-id`` header. A
handler may put a note in ``request.state.outcome`` (e.g. "client disconnected") for the log line.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("tritonvlm.frontend.access")

REQUEST_ID_HEADER = "x-request-id"


def new_request_id(prefix: str = "chatcmpl") -> str:
    """A fresh request id: ``<prefix>-<uuid4 hex>`` (a chat completion's id is ``chatcmpl-...``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


class AccessLogMiddleware:
    """Assign request ids and log each HTTP request when its response is over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.endswith("/chat/completions"):
            prefix = "chatcmpl"
        elif path.endswith("/completions"):
            prefix = "cmpl"
        else:
            prefix = "req"
        request_id = new_request_id(prefix)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        outcome = ""
        try:
            await self.app(scope, receive, send_with_id)
            outcome = state.get("outcome", "")
        except Exception:
            status, outcome = status or 500, "unhandled error"  # answered by the app-wide 500 handler
            raise
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            latency_ms = (time.perf_counter() - start) * 1000.0
            logger.info(
                "%s %s %s %.1fms id=%s%s",
                scope.get("method", ""),
                scope.get("path", ""),
                status or "-",
                latency_ms,
                request_id,
                f" ({outcome})" if outcome else "",
            )
