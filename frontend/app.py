"""The FastAPI application: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus, :mod:`tritonvlm.frontend.metrics`), and with a
``batch_state_dir`` the Batch API (:mod:`tritonvlm.frontend.batch_api`).

A chat completion is: validate the request (schema, unsupported fields, model name, image count,
sampling parameters) → convert the messages to the wire form and collect the image URLs → fetch every
image concurrently → stream from the Triton ``vlm`` model, one Triton request per choice (``n``). A
text completion sends its raw prompt (``PROMPT``) or token ids (``INPUT_IDS``) instead. A streamed
request waits for the first delta before it answers, so errors up to that point (bad image, prompt too
long...) still get a real HTTP status; later errors go out as an SSE error event. A client that
disconnects at any point stops the work and cancels its Triton requests.

Before any route, the optional API key and the request body limit are checked
(:mod:`tritonvlm.frontend.security`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from tritonvlm import __version__
from tritonvlm.frontend.access_log import AccessLogMiddleware, new_request_id
from tritonvlm.frontend.batch_api import install_batch_api
from tritonvlm.frontend.completions import (
    ChatBackend,
    IndexedDelta,
    SSEResponse,
    chat_stream_events,
    collect_chat_completion,
    collect_text_completion,
    merge_streams,
    text_stream_events,
    to_api_error,
)
from tritonvlm.frontend.conversion import (
    build_completion_parameters,
    build_parameters,
    choice_parameters,
    to_wire_messages,
)
from tritonvlm.frontend.disconnect import ClientDisconnected, run_until_disconnect
from tritonvlm.frontend.errors import APIError, install_exception_handlers
from tritonvlm.frontend.media import DEFAULT_MAX_IMAGE_PIXELS, ImageRef, MediaFetcher, MiB
from tritonvlm.frontend.metrics import FrontendMetrics, route_label
from tritonvlm.frontend.protocol import (
    MAX_CHOICES,
    UNSUPPORTED_COMPLETION_FIELDS,
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TextContentPart,
    find_unsupported_fields,
)
from tritonvlm.frontend.security import APIKeyMiddleware, BodyLimitMiddleware
from tritonvlm.frontend.structured import response_format_constraint
from tritonvlm.frontend.tools import plan_tools
from tritonvlm.frontend.triton_client import TritonVLMClient

logger = logging.getLogger("tritonvlm.frontend.app")

# A prompt that fits a 4096-token context holds far fewer characters than this (text averages about 4
# characters per token): longer text is refused before it reaches a tokenizer.
DEFAULT_MAX_PROMPT_CHARS = 32 * 4096
# Status logged (not sent: nobody is listening) for a request whose client went away (nginx's 499).
_CLIENT_CLOSED = 499
_IMAGE_PARAM = re.compile(r"images\[(\d+)\]")


class _ClientGoneResponse(Response):
    """The response to a client that disconnected: nobody reads it, and sending may fail (ASGI 2.4)."""

    def __init__(self) -> None:
        super().__init__(status_code=_CLIENT_CLOSED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(OSError):
            await super().__call__(scope, receive, send)


@dataclass
class FrontendSettings:
    """How the frontend reaches Triton, the model name it serves, its limits and access control."""

    triton_grpc_url: str = "127.0.0.1:8001"
    served_model_name: str = "tritonvlm"
    media_fetch_timeout_s: float = 10.0
    max_image_bytes: int = 20 * MiB
    max_images_per_request: int = 8
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_private_media_urls: bool = False
    allowed_media_domains: tuple[str, ...] | str = ()  # empty: any host (the SSRF guard still applies)
    allowed_local_media_path: str | None = None  # None: file:// URLs are refused
    max_concurrent_media_fetches: int = 16
    max_request_body_bytes: int = 50 * MiB
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # text of one request, counted before tokenizing
    api_key: str | None = None  # None or "": no authentication
    batch_state_dir: str | None = None  # the Batch API's store (/v1/files, /v1/batches); None: no Batch API
    batch_concurrency: int = 16  # batch requests in flight while no interactive request is
    batch_busy_concurrency: int = 1  # ... and while some are (the others are preempted)
    system_fingerprint: str = f"tritonvlm-{__version__}"


def _check_request(
    body: SamplingFields, settings: FrontendSettings, unsupported: tuple[str, ...] = UNSUPPORTED_FIELDS
) -> None:
    problems = find_unsupported_fields(body, unsupported)
    if problems:
        name, message = problems[0]
        raise APIError(400, message, param=name, code="unsupported_parameter")
    model = getattr(body, "model", None)
    if model != settings.served_model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def _check_completion(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a text completion, after the checks of the fields served only in part."""
    n = body.num_choices
    if body.suffix:
        raise _unsupported("suffix", "'suffix' (insertion) is not supported by this server")
    if body.best_of is not None and body.best_of != n:
        raise _unsupported("best_of", "'best_of' is only supported when it equals 'n'")
    prompts = body.prompts
    if body.echo and body.logprobs is not None:
        raise _unsupported("echo", "'echo' together with 'logprobs' is not supported (no prompt logprobs)")
    if body.echo and any(not isinstance(p, str) for p in prompts):
        raise _unsupported("echo", "'echo' is only supported for text prompts, not token ids")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and not prompt:
            param = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            raise APIError(400, "The prompt must not be empty.", param=param, code="invalid_value")
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(
            400,
            f"Too many choices: {len(prompts)} prompts x n={n} (at most {MAX_CHOICES}).",
            param="n",
            code="invalid_value",
        )
    return prompts


def message_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in a conversation (string contents and text parts; images not counted)."""
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:  # None: an assistant message with only tool_calls
            total += sum(len(part.text) for part in message.content if isinstance(part, TextContentPart))
    return total


def check_prompt_chars(chars: int, limit: int, param: str) -> None:
    """A 400 (``context_length_exceeded``) when a request's text is longer than ``limit`` characters.

    Counting characters costs nothing next to tokenizing them: this bound stops a huge text before it
    reaches the tokenizer (which would hold a preprocess instance for seconds only to refuse it).
    """
    if chars > limit:
        raise APIError(
            400,
            f"The prompt holds {chars} characters of text, over this server's limit of {limit} "
            "(far more than the model's context can take). Shorten it.",
            param=param,
            code="context_length_exceeded",
        )


def _choice_ids(request_id: str, count: int) -> list[str]:
    return [request_id] if count == 1 else [f"{request_id}-{i}" for i in range(count)]


def create_app(
    settings: FrontendSettings,
    client: ChatBackend | None = None,
    media_fetcher: MediaFetcher | None = None,
    metrics: FrontendMetrics | None = None,
) -> FastAPI:
    """Build the app. ``client`` defaults to a :class:`TritonVLMClient` for ``settings.triton_grpc_url``
    and ``media_fetcher`` to one configured from ``settings``; the app closes the ones it created.
    ``metrics`` defaults to a fresh :class:`FrontendMetrics` (a given fetcher without metrics of its
    own reports to it too)."""
    metrics = metrics or FrontendMetrics()
    own_client = client is None
    backend: ChatBackend = client if client is not None else TritonVLMClient(settings.triton_grpc_url)
    own_fetcher = media_fetcher is None
    fetcher = media_fetcher or MediaFetcher(
        timeout_s=settings.media_fetch_timeout_s,
        max_bytes=settings.max_image_bytes,
        max_concurrency=settings.max_concurrent_media_fetches,
        allow_private=settings.allow_private_media_urls,
        max_pixels=settings.max_image_pixels,
        allowed_local_path=settings.allowed_local_media_path,
        allowed_domains=settings.allowed_media_domains,
    )
    if getattr(fetcher, "metrics", None) is None:
        fetcher.metrics = metrics
    fingerprint = settings.system_fingerprint

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if batch_service is not None:
            await batch_service.start()
        try:
            yield
        finally:
            if batch_service is not None:
                await batch_service.stop()
            if own_fetcher:
                await fetcher.aclose()
            if own_client and isinstance(backend, TritonVLMClient):
                await backend.close()

    app = FastAPI(title="tritonvlm OpenAI-compatible API", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.client = backend
    app.state.media_fetcher = fetcher
    app.state.metrics = metrics
    install_exception_handlers(app)
    # The last added runs first: access log → API key → body limit → routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)

    @app.get("/health")
    async def health() -> Response:
        """200 when Triton and the ``vlm`` model are ready, 503 otherwise."""
        if await backend.is_ready():
            return JSONResponse({"status": "ok"})
        error = APIError(503, "The inference server or its model is not ready.", code="service_unavailable")
        return error.to_response()

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """The frontend's Prometheus metrics (text exposition format)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The one model this server serves."""
        return ModelList(data=[ModelCard(id=settings.served_model_name)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def retrieve_model(model_id: str) -> ModelCard:
        """The model card, or 404 for any other name."""
        if model_id != settings.served_model_name:
            raise APIError(
                404,
                f"The model `{model_id}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return ModelCard(id=settings.served_model_name)

    async def serve(
        request: Request,
        request_id: str,
        *,
        stream: bool,
        start: Callable[[], Awaitable[AsyncIterator[IndexedDelta]]],
        collect: Callable[[AsyncIterator[IndexedDelta]], Awaitable[BaseModel]],
        events: Callable[[IndexedDelta | None, AsyncIterator[IndexedDelta]], AsyncIterator[bytes]],
        fix_param: Callable[[str | None], str | None],
    ) -> Response:
        """Run a completion whole or streamed, mapping failures to OpenAI errors."""

        async def whole() -> BaseModel:
            return await collect(await start())

        async def open_stream() -> tuple[IndexedDelta | None, AsyncIterator[IndexedDelta]]:
            merged = await start()
            try:
                first = await anext(merged, None)
            except BaseException:
                await merged.aclose()  # type: ignore[attr-defined]
                raise
            started = getattr(request.state, "started_at", None)
            if first is not None and started is not None:
                metrics.first_token(route_label(request.scope), time.perf_counter() - started)
            return first, merged

        try:
            if not stream:
                result = await run_until_disconnect(request.receive, whole())
                return JSONResponse(result.model_dump(mode="json"))
            first, merged = await run_until_disconnect(request.receive, open_stream())
        except ClientDisconnected:
            request.state.outcome = "client disconnected"
            return _ClientGoneResponse()
        except APIError:
            raise
        except Exception as exc:
            error = to_api_error(exc)
            if error.code == "internal_error":
                raise  # the app-wide handler logs it and answers 500
            error.param = fix_param(error.param)
            logger.warning("request %s failed: %s %s", request_id, error.status_code, error.message)
            raise error from None
        return SSEResponse(events(first, merged))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Create a chat completion, whole or streamed as server-sent events."""
        request_id = getattr(request.state, "request_id", None) or new_request_id()
        _check_request(body, settings)
        check_prompt_chars(message_chars(body.messages), settings.max_prompt_chars, "messages")
        n = body.num_choices
        image_refs: list[ImageRef] = []
        tool_plan = plan_tools(body)
        constraint = tool_plan.constraint or response_format_constraint(body.response_format)
        template_tools = {"tools": tool_plan.tools} if tool_plan.tools else {}

        async def start() -> AsyncIterator[IndexedDelta]:
            messages, refs = to_wire_messages(body.messages)
            image_refs.extend(refs)
            if len(refs) > settings.max_images_per_request:
                raise APIError(
                    400,
                    f"Too many images: {len(refs)} (at most {settings.max_images_per_request} per request).",
                    param="messages",
                    code="too_many_images",
                )
            parameters = build_parameters(body)
            if constraint is not None:
                parameters["guided"] = constraint
            images = await fetcher.fetch_all(refs)
            logger.debug(
                "request %s: %d messages, %d images, n=%d, parameters %s",
                request_id,
                len(messages),
                len(images),
                n,
                parameters,
            )
            ids = _choice_ids(request_id, n)
            return merge_streams(
                [
                    backend.stream(
                        messages, images, choice_parameters(parameters, i), ids[i], **template_tools
                    )
                    for i in range(n)
                ]
            )

        def fix_param(param: str | None) -> str | None:
            """Triton names images by position (``images[k]``, or ``images`` for all of them): name the
            content part instead (the message list when several images are meant)."""
            match = _IMAGE_PARAM.fullmatch(param or "")
            if match and int(match.group(1)) < len(image_refs):
                return image_refs[int(match.group(1))].param
            if param == "images":
                return image_refs[0].param if len(image_refs) == 1 else "messages"
            return param

        logprobs = bool(body.logprobs)
        return await serve(
            request,
            request_id,
            stream=bool(body.stream),
            start=start,
            collect=lambda merged: collect_chat_completion(
                merged,
                request_id=request_id,
                model=settings.served_model_name,
                num_choices=n,
                logprobs=logprobs,
                system_fingerprint=fingerprint,
                tools=tool_plan,
            ),
            events=lambda first, merged: chat_stream_events(
                first,
                merged,
                request_id=request_id,
                model=settings.served_model_name,
                include_usage=body.include_usage,
                num_choices=n,
                system_fingerprint=fingerprint,
                state=request.scope.setdefault("state", {}),
                tools=tool_plan,
            ),
            fix_param=fix_param,
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Create a (legacy) text completion from a raw prompt or token ids, whole or streamed."""
        request_id = getattr(request.state, "request_id", None) or new_request_id("cmpl")
        _check_request(body, settings, UNSUPPORTED_COMPLETION_FIELDS)
        prompts = _check_completion(body)
        check_prompt_chars(
            sum(len(p) for p in prompts if isinstance(p, str)), settings.max_prompt_chars, "prompt"
        )
        parameters = build_completion_parameters(body)
        n = body.num_choices
        prompt_of_choice = [p for p in range(len(prompts)) for _ in range(n)]
        echoes = [prompts[p] if body.echo else "" for p in prompt_of_choice]

        async def start() -> AsyncIterator[IndexedDelta]:
            ids = _choice_ids(request_id, len(prompt_of_choice))
            streams = []
            for c, p in enumerate(prompt_of_choice):
                prompt = prompts[p]
                form: dict[str, Any] = (
                    {"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": prompt}
                )
                streams.append(backend.stream(None, [], choice_parameters(parameters, c % n), ids[c], **form))
            return merge_streams(streams)

        def fix_param(param: str | None) -> str | None:
            return "prompt" if param in ("messages", "input_ids", "images") else param

        logprobs = body.logprobs is not None
        return await serve(
            request,
            request_id,
            stream=bool(body.stream),
            start=start,
            collect=lambda merged: collect_text_completion(
                merged,
                request_id=request_id,
                model=settings.served_model_name,
                echoes=echoes,  # type: ignore[arg-type]
                prompt_of_choice=prompt_of_choice,
                logprobs=logprobs,
                system_fingerprint=fingerprint,
            ),
            events=lambda first, merged: text_stream_events(
                first,
                merged,
                request_id=request_id,
                model=settings.served_model_name,
                include_usage=body.include_usage,
                echoes=echoes,  # type: ignore[arg-type]
                prompt_of_choice=prompt_of_choice,
                logprobs=logprobs,
                system_fingerprint=fingerprint,
                state=request.scope.setdefault("state", {}),
            ),
            fix_param=fix_param,
        )

    # /v1/files and /v1/batches, the worker that runs accepted batches (started by the lifespan) and
    # the count of interactive requests that makes it yield to them.
    batch_service = install_batch_api(app, settings) if settings.batch_state_dir else None
    return app
