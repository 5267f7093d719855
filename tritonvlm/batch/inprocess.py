"""Run batch requests through the frontend's own request path, in process.

:class:`InProcessAPI` builds a second instance of the frontend app (:func:`create_app`) around the
Triton client and media fetcher it is given and sends each request to it over ASGI, with no socket: a
batch line goes through the same validation, image fetching, conversion, Triton call and error mapping
as ``POST /v1/chat/completions``, so its answer (errors included) is the body the server would send.
That instance has its own metrics and no API key, and is never counted as interactive traffic.

:func:`execute_line` turns one input line into its output record; a Triton that is unreachable or not
ready (503) is waited for instead of being recorded, so an outage does not fail the rest of a batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from tritonvlm.batch.lines import BatchLine, error_record, response_record
from tritonvlm.frontend.errors import error_body

if TYPE_CHECKING:
    from tritonvlm.frontend.app import FrontendSettings
    from tritonvlm.frontend.completions import ChatBackend
    from tritonvlm.frontend.media import MediaFetcher

logger = logging.getLogger("tritonvlm.batch")

UNAVAILABLE = 503
_REQUEST_ID_HEADER = "x-request-id"


@dataclass
class APIResponse:
    """What the in-process API answered."""

    status_code: int
    body: Any
    request_id: str


class InProcessAPI:
    """The OpenAI API of an in-process frontend app (see the module docstring)."""

    def __init__(self, settings: FrontendSettings, client: ChatBackend, fetcher: MediaFetcher) -> None:
        from tritonvlm.frontend.app import create_app
        from tritonvlm.frontend.metrics import FrontendMetrics

        inner = dataclasses.replace(settings, api_key=None, batch_state_dir=None)
        self.client = client
        self.app = create_app(
            inner, client=client, media_fetcher=fetcher, metrics=FrontendMetrics(process=False)
        )
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self._http = httpx.AsyncClient(transport=transport, base_url="http://batch.invalid", timeout=None)

    async def post(self, url: str, body: dict[str, Any], request_id: str | None = None) -> APIResponse:
        """POST ``body`` (JSON) to ``url``; the JSON answer, whatever its status. ``request_id`` is sent as
        ``x-request-id`` (the answer's id is then ``chatcmpl-<request_id>``, also in the logs)."""
        content = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"content-type": "application/json"}
        if request_id:
            headers[_REQUEST_ID_HEADER] = request_id
        response = await self._http.post(url, content=content, headers=headers)
        try:
            payload = response.json()
        except ValueError:
            payload = error_body(response.text[:500] or "empty response", "server_error")
        return APIResponse(response.status_code, payload, response.headers.get(_REQUEST_ID_HEADER, ""))

    async def is_ready(self) -> bool:
        """Whether Triton and the ``vlm`` model are ready."""
        return await self.client.is_ready()

    async def aclose(self) -> None:
        await self._http.aclose()


class BackendUnavailable(Exception):
    """Triton stayed unreachable or not ready for longer than allowed."""


class ReadyGate:
    """Waits until the backend is ready again; one caller polls, the others wait for its answer."""

    def __init__(self, is_ready: Callable[[], Awaitable[bool]], interval_s: float = 1.0) -> None:
        self._is_ready = is_ready
        self.interval_s = interval_s
        self._lock = asyncio.Lock()
        self._ready_at = 0.0

    async def wait(self, since: float, timeout_s: float | None) -> None:
        """Return once the backend has been seen ready after ``since`` (a ``time.monotonic()``); raise
        :class:`BackendUnavailable` after ``timeout_s`` (``None``: wait for ever)."""
        async with self._lock:
            if self._ready_at > since:
                return
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not await self._is_ready():
                if deadline is not None and time.monotonic() >= deadline:
                    raise BackendUnavailable(f"Triton was not ready for {timeout_s:g} s")
                await asyncio.sleep(self.interval_s)
            self._ready_at = time.monotonic()


def _stream_refused() -> dict[str, Any]:
    return error_body(
        "Streaming is not supported in batch requests: remove 'stream'.",
        "invalid_request_error",
        "stream",
        "unsupported_parameter",
    )


async def execute_line(
    api: InProcessAPI,
    item: BatchLine,
    gate: ReadyGate,
    unavailable_timeout_s: float | None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The output record of one input line. A 503 (Triton unavailable) is retried once Triton is ready
    again, for up to ``unavailable_timeout_s`` (then :class:`BackendUnavailable`)."""
    if item.error is not None:
        return error_record(item.custom_id, item.error)
    assert item.url is not None and item.body is not None
    if item.body.get("stream"):
        return response_record(item.custom_id, 400, "", _stream_refused())
    while True:
        sent = time.monotonic()
        answer = await api.post(item.url, item.body, request_id)
        if answer.status_code != UNAVAILABLE:
            return response_record(item.custom_id, answer.status_code, answer.request_id, answer.body)
        logger.warning("line %d (%s): Triton unavailable; waiting for it", item.line, item.custom_id)
        await gate.wait(sent, unavailable_timeout_s)
