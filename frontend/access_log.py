"""One log line per HTTP request: method, path, status, latency and request id.

A plain ASGI middleware (not ``BaseHTTPMiddleware``, which would get in the way of streaming and
disconnect detection). It gives each request an id (``chatcmpl-<uuid hex>`` for chat completions,
``cmpl-<uuid hex>`` for text completions, ``req-<uuid hex>`` otherwise), stores it in
``request.state.request_id`` for the handlers, and returns it in the ``x-request-id`` header. The
completion routes use it as the response ``id`` and as the Triton request id, so the same id is in
this log line and in Triton's log (``request <id> done``).

A client (or a gateway in front) may send its own ``x-request-id``: when it is 1-64 characters of
``A-Z a-z 0-9 . _ : -`` it replaces the random part (``chatcmpl-<client id>``), else it is ignored. Ids
are not required to be unique. A handler may put a note in ``request.state.outcome`` (e.g. "client
disconnected") for the log line. With a :class:`~tritonvlm.frontend.metrics.FrontendMetrics`, every
request is also counted and timed there.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tritonvlm.frontend.metrics import FrontendMetrics

logger = logging.getLogger("tritonvlm.frontend.access")

REQUEST_ID_HEADER = "x-request-id"
# What a client-sent x-request-id may be: short, and safe in logs, ids and Triton request ids.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_request_id(prefix: str = "chatcmpl", client_id: str | None = None) -> str:
    """A request id: ``<prefix>-<client_id>`` for a valid client id, else ``<prefix>-<uuid4 hex>``."""
    if client_id is not None and _CLIENT_ID.fullmatch(client_id):
        return f"{prefix}-{client_id}"
    return f"{prefix}-{uuid.uuid4().hex}"


def client_request_id(scope: Scope) -> str | None:
    """The ``x-request-id`` header the client sent (undecodable: ``None``)."""
    for key, value in scope.get("headers", []):
        if key.lower() == REQUEST_ID_HEADER.encode():
            try:
                return value.decode("ascii").strip()
            except UnicodeDecodeError:
                return None
    return None


class AccessLogMiddleware:
    """Assign request ids and log each HTTP request when its response is over."""

    def __init__(self, app: ASGIApp, metrics: FrontendMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

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
        request_id = new_request_id(prefix, client_request_id(scope))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 0
        start = time.perf_counter()
        state["started_at"] = start  # for the time to first token
        if self.metrics is not None:
            self.metrics.request_started(scope)

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
            latency = time.perf_counter() - start
            if self.metrics is not None:
                self.metrics.request_finished(scope, status, latency)
            latency_ms = latency * 1000.0
            logger.info(
                "%s %s %s %.1fms id=%s%s",
                scope.get("method", ""),
                scope.get("path", ""),
                status or "-",
                latency_ms,
                request_id,
                f" ({outcome})" if outcome else "",
            )
