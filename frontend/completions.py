"""Turn the ``StreamDelta`` streams of a request's Triton calls into an OpenAI answer.

A request with ``n`` choices (times the number of prompts, for text completions) runs one Triton
stream per choice; :func:`merge_streams` interleaves them as ``(choice index, delta)`` pairs.

For chat completions :func:`collect_chat_completion` aggregates them into one ``ChatCompletion`` and
:func:`chat_stream_events` writes them as server-sent events: a role chunk per choice, content chunks
(with ``logprobs`` when asked), a chunk with each choice's finish reason, an optional usage chunk,
``data: [DONE]``. :func:`collect_text_completion` and :func:`text_stream_events` do the same for the
legacy ``text_completion`` object. An error after the first event is sent as a
``data: {"error": ...}`` event followed by ``[DONE]``. All of them close the Triton streams whatever
happens (which cancels the gRPC calls of answers that were not finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
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
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    DeltaMessage,
    UsageInfo,
)
from tritonvlm.frontend.tools import ToolCallStreamParser, ToolPlan, to_message
from tritonvlm.frontend.triton_client import (
    StreamDelta,
    TritonRequestError,
    TritonStalledError,
    TritonUnavailableError,
)

logger = logging.getLogger("tritonvlm.frontend.completions")

_FINISH_REASONS = ("stop", "length")
_MERGE_QUEUE_SIZE = 64


class ChatBackend(Protocol):
    """What the app needs from a Triton client (``TritonVLMClient``, or a fake in unit tests).

    Chat completions call ``stream(messages, images, parameters, request_id)``; text completions call
    it with ``messages=None`` and the keyword ``prompt`` (text) or ``prompt_ids`` (token ids).
    """

    async def is_ready(self) -> bool: ...

    def stream(
        self,
        messages: list[dict[str, Any]] | None,
        images: Sequence[bytes],
        parameters: dict[str, Any],
        request_id: str,
        **prompt: Any,
    ) -> AsyncIterator[StreamDelta]: ...


def to_api_error(exc: BaseException) -> APIError:
    """The OpenAI error for an exception raised while serving a completion."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TritonRequestError):
        if exc.client_error:
            return APIError(400, exc.message, param=exc.param, code="invalid_value")
        return APIError(500, exc.message, code="inference_error")
    if isinstance(exc, TritonStalledError):
        return APIError(503, str(exc), code="service_unavailable")
    if isinstance(exc, TritonUnavailableError):
        return APIError(503, "The inference server is unavailable.", code="service_unavailable")
    return internal_error()


def _finish_reason(reason: str | None, request_id: str) -> str:
    if reason in _FINISH_REASONS:
        return reason
    logger.warning("request %s: Triton gave finish reason %r; answering 'stop'", request_id, reason)
    return "stop"


# --------------------------------------------------------------------------- several streams as one

IndexedDelta = tuple[int, StreamDelta]


async def merge_streams(streams: Sequence[AsyncIterator[StreamDelta]]) -> AsyncIterator[IndexedDelta]:
    """Interleave the streams as ``(index, delta)`` in arrival order; the first error ends them all.

    Closing (or cancelling) the merged stream closes (or cancels) every stream. A single stream is
    iterated directly, without a task.
    """
    if len(streams) == 1:
        only = streams[0]
        async with contextlib.aclosing(only):  # type: ignore[type-var]
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, StreamDelta | None, BaseException | None]] = asyncio.Queue(
        _MERGE_QUEUE_SIZE
    )

    async def pump(index: int, stream: AsyncIterator[StreamDelta]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for delta in stream:
                    await queue.put((index, delta, None))
        except Exception as exc:
            await queue.put((index, None, exc))
        else:
            await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                remaining -= 1
                continue
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: nothing is logged as "never retrieved"


@dataclass
class ChoiceState:
    """What one choice's stream has produced so far."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    seen: bool = False
    finished: bool = False  # its finish reason was written (streaming)

    def add(self, delta: StreamDelta) -> None:
        self.texts.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens = delta.completion_tokens
        self.cached_tokens = delta.cached_tokens
        self.seen = True

    @property
    def text(self) -> str:
        return "".join(self.texts)


def usage_of(states: Sequence[ChoiceState], prompt_of_choice: Sequence[int] | None = None) -> UsageInfo:
    """Usage of a request: each prompt counted once (choices of the same prompt share it), the
    completions summed. ``prompt_of_choice[i]`` is the prompt of choice ``i`` (default: all one)."""
    prompts: dict[int, tuple[int, int]] = {}
    for i, state in enumerate(states):
        key = prompt_of_choice[i] if prompt_of_choice is not None else 0
        if state.seen and key not in prompts:
            prompts[key] = (state.prompt_tokens, state.cached_tokens)
    return UsageInfo.of(
        sum(p for p, _ in prompts.values()),
        sum(s.completion_tokens for s in states),
        sum(c for _, c in prompts.values()),
    )


async def _drain(merged: AsyncIterator[IndexedDelta], num_choices: int) -> list[ChoiceState]:
    states = [ChoiceState() for _ in range(num_choices)]
    async with contextlib.aclosing(merged):  # type: ignore[type-var]
        async for index, delta in merged:
            states[index].add(delta)
    return states


# --------------------------------------------------------------------------- chat completions


async def collect_chat_completion(
    merged: AsyncIterator[IndexedDelta],
    *,
    request_id: str,
    model: str,
    num_choices: int = 1,
    logprobs: bool = False,
    system_fingerprint: str | None = None,
    tools: ToolPlan | None = None,
) -> ChatCompletion:
    """Aggregate whole Triton streams into one ``ChatCompletion`` (usage from the last deltas); with
    ``tools``, tool calls in the output become ``message.tool_calls``."""
    states = await _drain(merged, num_choices)
    choices = []
    for i, state in enumerate(states):
        content, tool_calls, finish = to_message(
            state.text, _finish_reason(state.finish_reason, request_id), tools or ToolPlan()
        )
        choices.append(
            ChatCompletionChoice(
                index=i,
                message=ChatCompletionMessage(content=content, tool_calls=tool_calls),
                finish_reason=finish,  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs(content=state.logprobs) if logprobs else None,
            )
        )
    return ChatCompletion(
        id=request_id,
        model=model,
        choices=choices,
        usage=usage_of(states),
        system_fingerprint=system_fingerprint,
    )


def sse(data: str) -> bytes:
    """One server-sent event carrying ``data``."""
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


async def _sse_body(
    produce: Callable[[], AsyncIterator[bytes]],
    merged: AsyncIterator[IndexedDelta],
    request_id: str,
    state: MutableMapping[str, Any] | None,
) -> AsyncIterator[bytes]:
    """Run ``produce`` (the events), turn a failure into an SSE error event, end with ``[DONE]``, and
    close ``merged`` whatever happens. ``state`` (the request state) gets an ``outcome`` note when the
    stream fails or is abandoned."""
    finished = False
    try:
        async with contextlib.aclosing(merged):  # type: ignore[type-var]
            try:
                async with contextlib.aclosing(produce()) as events:
                    async for event in events:
                        yield event
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


async def _deltas(
    first: IndexedDelta | None, merged: AsyncIterator[IndexedDelta]
) -> AsyncIterator[IndexedDelta]:
    item = first
    while item is not None:
        yield item
        item = await anext(merged, None)


def chat_stream_events(
    first: IndexedDelta | None,
    merged: AsyncIterator[IndexedDelta],
    *,
    request_id: str,
    model: str,
    include_usage: bool,
    num_choices: int = 1,
    system_fingerprint: str | None = None,
    state: MutableMapping[str, Any] | None = None,
    tools: ToolPlan | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed chat completion; ``first`` is the item already taken from ``merged``.

    Each choice gets a role chunk, then its content chunks (a token whose text is held back, an
    incomplete character, still sends its ``logprobs`` with empty content), then a chunk with its
    finish reason as soon as it finishes. With ``tools``, tool calls go out as ``delta.tool_calls``
    (:class:`ToolCallStreamParser`).
    """
    created = int(time.time())
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(
        index: int, delta: DeltaMessage, finish_reason: str | None = None, logprobs: Any = None
    ) -> bytes:
        choice = ChatCompletionChunkChoice(
            index=index,
            delta=delta,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            logprobs=ChoiceLogprobs(content=logprobs) if logprobs else None,
        )
        body = ChatCompletionChunk(
            id=request_id,
            created=created,
            model=model,
            choices=[choice],
            system_fingerprint=system_fingerprint,
            **usage_field,
        )
        return sse(body.model_dump_json())

    def finish_chunks(index: int, parser: ToolCallStreamParser, reason: str | None) -> list[bytes]:
        rest, calls = parser.finish()
        out = [chunk(index, DeltaMessage(content=rest))] if rest else []
        if calls:
            out.append(chunk(index, DeltaMessage(tool_calls=calls)))
        reason = _finish_reason(reason, request_id)
        out.append(
            chunk(index, DeltaMessage(), "tool_calls" if parser.called and reason == "stop" else reason)
        )
        return out

    async def produce() -> AsyncIterator[bytes]:
        states = [ChoiceState() for _ in range(num_choices)]
        parsers = [ToolCallStreamParser(tools or ToolPlan()) for _ in range(num_choices)]
        for i in range(num_choices):
            yield chunk(i, DeltaMessage(role="assistant", content=""))
        async with contextlib.aclosing(_deltas(first, merged)) as items:
            async for index, delta in items:
                choice = states[index]
                choice.add(delta)
                text, calls = parsers[index].feed(delta.text)
                if text or delta.logprobs:
                    yield chunk(index, DeltaMessage(content=text), logprobs=delta.logprobs)
                if calls:
                    yield chunk(index, DeltaMessage(tool_calls=calls))
                if delta.finish_reason and not choice.finished:
                    choice.finished = True
                    for event in finish_chunks(index, parsers[index], delta.finish_reason):
                        yield event
        for i, choice in enumerate(states):
            if not choice.finished:  # a stream that ended without a finish reason
                for event in finish_chunks(i, parsers[i], choice.finish_reason):
                    yield event
        if include_usage:
            final = ChatCompletionChunk(
                id=request_id,
                created=created,
                model=model,
                choices=[],
                usage=usage_of(states),
                system_fingerprint=system_fingerprint,
            )
            yield sse(final.model_dump_json())

    return _sse_body(produce, merged, request_id, state)


# --------------------------------------------------------------------------- text completions


class _LegacyLogprobs:
    """Builds the legacy ``logprobs`` object of a text completion choice, token by token."""

    def __init__(self, offset: int) -> None:
        self.offset = offset  # characters of text before the next token (echoed prompt included)

    def add(self, delta: StreamDelta) -> CompletionLogprobs:
        """The logprobs of ``delta``'s tokens; a token starts where the text emitted so far ends."""
        out = CompletionLogprobs()
        for entry in delta.logprobs or ():
            out.tokens.append(str(entry.get("token", "")))
            out.token_logprobs.append(float(entry.get("logprob", 0.0)))
            top = entry.get("top_logprobs") or []
            out.top_logprobs.append({str(t.get("token", "")): float(t.get("logprob", 0.0)) for t in top})
            out.text_offset.append(self.offset)
        self.offset += len(delta.text)
        return out


def _extend(total: CompletionLogprobs, part: CompletionLogprobs) -> None:
    total.tokens.extend(part.tokens)
    total.token_logprobs.extend(part.token_logprobs)
    total.top_logprobs.extend(part.top_logprobs)
    total.text_offset.extend(part.text_offset)


async def collect_text_completion(
    merged: AsyncIterator[IndexedDelta],
    *,
    request_id: str,
    model: str,
    echoes: Sequence[str],
    prompt_of_choice: Sequence[int],
    logprobs: bool = False,
    system_fingerprint: str | None = None,
) -> Completion:
    """Aggregate whole Triton streams into one ``text_completion``; choice ``i`` starts with
    ``echoes[i]`` (the prompt, when ``echo`` is set, else "")."""
    num_choices = len(echoes)
    states = [ChoiceState() for _ in range(num_choices)]
    builders = [_LegacyLogprobs(len(echo)) for echo in echoes]
    totals = [CompletionLogprobs() for _ in range(num_choices)]
    async with contextlib.aclosing(merged):  # type: ignore[type-var]
        async for index, delta in merged:
            states[index].add(delta)
            _extend(totals[index], builders[index].add(delta))
    return Completion(
        id=request_id,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=echoes[i] + state.text,
                logprobs=totals[i] if logprobs else None,
                finish_reason=_finish_reason(state.finish_reason, request_id),  # type: ignore[arg-type]
            )
            for i, state in enumerate(states)
        ],
        usage=usage_of(states, prompt_of_choice),
        system_fingerprint=system_fingerprint,
    )


def text_stream_events(
    first: IndexedDelta | None,
    merged: AsyncIterator[IndexedDelta],
    *,
    request_id: str,
    model: str,
    include_usage: bool,
    echoes: Sequence[str],
    prompt_of_choice: Sequence[int],
    logprobs: bool = False,
    system_fingerprint: str | None = None,
    state: MutableMapping[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed text completion: the echoed prompt (if any), text chunks, a chunk
    with each choice's finish reason, an optional usage chunk, ``[DONE]``."""
    created = int(time.time())
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
    num_choices = len(echoes)

    def chunk(
        index: int, text: str, finish_reason: str | None = None, lp: CompletionLogprobs | None = None
    ) -> bytes:
        choice = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish_reason)  # type: ignore[arg-type]
        body = Completion(
            id=request_id,
            created=created,
            model=model,
            choices=[choice],
            system_fingerprint=system_fingerprint,
            **usage_field,
        )
        return sse(body.model_dump_json())

    async def produce() -> AsyncIterator[bytes]:
        states = [ChoiceState() for _ in range(num_choices)]
        builders = [_LegacyLogprobs(len(echo)) for echo in echoes]
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async with contextlib.aclosing(_deltas(first, merged)) as items:
            async for index, delta in items:
                choice = states[index]
                choice.add(delta)
                part = builders[index].add(delta)
                if delta.text or delta.logprobs:
                    yield chunk(index, delta.text, lp=part if logprobs else None)
                if delta.finish_reason and not choice.finished:
                    choice.finished = True
                    yield chunk(index, "", _finish_reason(delta.finish_reason, request_id))
        for i, choice in enumerate(states):
            if not choice.finished:
                yield chunk(i, "", _finish_reason(choice.finish_reason, request_id))
        if include_usage:
            final = Completion(
                id=request_id,
                created=created,
                model=model,
                choices=[],
                usage=usage_of(states, prompt_of_choice),
                system_fingerprint=system_fingerprint,
            )
            yield sse(final.model_dump_json())

    return _sse_body(produce, merged, request_id, state)


# --------------------------------------------------------------------------- the response


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
