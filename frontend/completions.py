"""Turn the ``StreamDelta`` stream of one Triton request into an OpenAI answer.

:func:`collect_completion` aggregates it into one ``ChatCompletion``; :func:`stream_events` writes it
as server-sent events: a role chunk, content chunks, a chunk with the finish reason, an optional usage
chunk, ``data: [DONE]``. An error after the first event is sent as a ``data: {"error": ...}`` event
followed by ``[DONE]``. Both close the Triton stream whatever happens (which cancels its gRPC call
when the answer was not finished).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, Protocol

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tritonvlm.frontend.errors import APIError, internal_error
from tritonvlm.frontend.protocol import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    DeltaMessage,
    UsageInfo,
)
from tritonvlm.frontend.triton_client import StreamDelta, TritonRequestError, TritonUnavailableError

logger = logging.getLogger("tritonvlm.frontend.completions")

_FINISH_REASONS = ("stop", "length")


class ChatBackend(Protocol):
    """What the app needs from a Triton client (``TritonVLMClient``, or a fake in unit tests)."""

    async def is_ready(self) -> bool: ...

    def stream(
        self,
        messages: list[dict[str, Any]],
        images: list[bytes],
        parameters: dict[str, Any],
        request_id: str,
    ) -> AsyncIterator[StreamDelta]: ...


def to_api_error(exc: BaseException) -> APIError:
    """The OpenAI error for an exception raised while serving a completion."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TritonRequestError):
        if exc.client_error:
            return APIError(400, exc.message, param=exc.param, code="invalid_value")
        return APIError(500, exc.message, code="inference_error")
    if isinstance(exc, TritonUnavailableError):
        return APIError(503, "The inference server is unavailable.", code="service_unavailable")
    return internal_error()


def _finish_reason(reason: str | None, request_id: str) -> str:
    if reason in _FINISH_REASONS:
        return reason
    logger.warning("request %s: Triton gave finish reason %r; answering 'stop'", request_id, reason)
    return "stop"


async def collect_completion(
    deltas: AsyncIterator[StreamDelta], *, request_id: str, model: str
) -> ChatCompletion:
    """Aggregate a whole Triton stream into one ``ChatCompletion`` (usage from the last delta)."""
    texts: list[str] = []
    last: StreamDelta | None = None
    reason: str | None = None
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            texts.append(delta.text)
            reason = delta.finish_reason or reason
            last = delta
    usage = UsageInfo.of(last.prompt_tokens, last.completion_tokens) if last else UsageInfo()
    return ChatCompletion(
        id=request_id,
        model=model,
        choices=[
            ChatCompletionChoice(
                message=ChatCompletionMessage(content="".join(texts)),
                finish_reason=_finish_reason(reason, request_id),  # type: ignore[arg-type]
            )
        ],
        usage=usage,
    )


def sse(data: str) -> bytes:
    """One server-sent event carrying ``data``."""
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


async def stream_events(
    first: StreamDelta | None,
    deltas: AsyncIterator[StreamDelta],
    *,
    request_id: str,
    model: str,
    include_usage: bool,
    state: MutableMapping[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed completion; ``first`` is the delta already taken from ``deltas``.

    ``state`` (the request state) gets an ``outcome`` note when the stream fails or is abandoned.
    """
    created = int(time.time())
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: DeltaMessage, finish_reason: str | None = None) -> bytes:
        choice = ChatCompletionChunkChoice(delta=delta, finish_reason=finish_reason)  # type: ignore[arg-type]
        body = ChatCompletionChunk(
            id=request_id, created=created, model=model, choices=[choice], **usage_field
        )
        return sse(body.model_dump_json())

    finished = False
    try:
        async with contextlib.aclosing(deltas):  # type: ignore[type-var]
            try:
                yield chunk(DeltaMessage(role="assistant", content=""))
                last: StreamDelta | None = None
                reason: str | None = None
                delta = first
                while delta is not None:
                    if delta.text:
                        yield chunk(DeltaMessage(content=delta.text))
                    reason = delta.finish_reason or reason
                    last = delta
                    delta = await anext(deltas, None)
                yield chunk(DeltaMessage(), _finish_reason(reason, request_id))
                if include_usage:
                    usage = UsageInfo.of(last.prompt_tokens, last.completion_tokens) if last else UsageInfo()
                    final = ChatCompletionChunk(
                        id=request_id, created=created, model=model, choices=[], usage=usage
                    )
                    yield sse(final.model_dump_json())
            except Exception as exc:  # after the first event, errors go out as an SSE event
                error = to_api_error(exc)
                if error.status_code >= 500 and not isinstance(
                    exc, TritonRequestError | TritonUnavailableError
                ):
                    logger.exception("request %s: unexpected error while streaming", request_id)
                else:
                    logger.warning("request %s: stream failed: %s", request_id, error.message)
                if state is not None:
                    state["outcome"] = f"stream error {error.status_code}: {error.message}"
                yield sse(json.dumps(error.to_body()))
        yield SSE_DONE
        finished = True
    finally:
        if not finished and state is not None and "outcome" not in state:
            state["outcome"] = "client disconnected"


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that always closes its body generator when it ends.

    Starlette stops iterating the body when the client disconnects but leaves the generator to the
    garbage collector; closing it here runs its ``finally`` blocks (and so cancels the Triton request)
    right away.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # ASGI 2.4 servers: a send failed because the client left
            scope.setdefault("state", {}).setdefault("outcome", "client disconnected")
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
