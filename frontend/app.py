"""The FastAPI application: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

A chat completion is: validate the request (schema, unsupported fields, model name, image count) →
convert the messages to the wire form and collect the image URLs → fetch every image concurrently →
build PARAMETERS → stream from the Triton ``vlm`` model. A streamed request waits for the first
delta before it answers, so errors up to that point (bad image, prompt too long...) still get a real
HTTP status; later errors go out as an SSE error event. A client that disconnects at any point stops
the work and cancels its Triton request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from tritonvlm.frontend.access_log import AccessLogMiddleware, new_request_id
from tritonvlm.frontend.completions import (
    ChatBackend,
    SSEResponse,
    collect_completion,
    stream_events,
    to_api_error,
)
from tritonvlm.frontend.conversion import build_parameters, to_wire_messages
from tritonvlm.frontend.disconnect import ClientDisconnected, run_until_disconnect
from tritonvlm.frontend.errors import APIError, install_exception_handlers
from tritonvlm.frontend.media import MediaFetcher, MiB
from tritonvlm.frontend.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    find_unsupported_fields,
)
from tritonvlm.frontend.triton_client import StreamDelta, TritonVLMClient

logger = logging.getLogger("tritonvlm.frontend.app")

# Status logged (not sent: nobody is listening) for a request whose client went away (nginx's 499).
_CLIENT_CLOSED = 499


class _ClientGoneResponse(Response):
    """The response to a client that disconnected: nobody reads it, and sending may fail (ASGI 2.4)."""

    def __init__(self) -> None:
        super().__init__(status_code=_CLIENT_CLOSED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(OSError):
            await super().__call__(scope, receive, send)


@dataclass
class FrontendSettings:
    """How the frontend reaches Triton, the model name it serves, and its media limits."""

    triton_grpc_url: str = "127.0.0.1:8001"
    served_model_name: str = "tritonvlm"
    media_fetch_timeout_s: float = 10.0
    max_image_bytes: int = 20 * MiB
    max_images_per_request: int = 8
    allow_private_media_urls: bool = False
    max_concurrent_media_fetches: int = 16


def _check_request(body: ChatCompletionRequest, settings: FrontendSettings) -> None:
    problems = find_unsupported_fields(body)
    if problems:
        name, message = problems[0]
        raise APIError(400, message, param=name, code="unsupported_parameter")
    if body.model != settings.served_model_name:
        raise APIError(
            404,
            f"The model `{body.model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


def create_app(
    settings: FrontendSettings,
    client: ChatBackend | None = None,
    media_fetcher: MediaFetcher | None = None,
) -> FastAPI:
    """Build the app. ``client`` defaults to a :class:`TritonVLMClient` for ``settings.triton_grpc_url``
    and ``media_fetcher`` to one configured from ``settings``; the app closes the ones it created."""
    own_client = client is None
    backend: ChatBackend = client if client is not None else TritonVLMClient(settings.triton_grpc_url)
    own_fetcher = media_fetcher is None
    fetcher = media_fetcher or MediaFetcher(
        timeout_s=settings.media_fetch_timeout_s,
        max_bytes=settings.max_image_bytes,
        max_concurrency=settings.max_concurrent_media_fetches,
        allow_private=settings.allow_private_media_urls,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if own_fetcher:
                await fetcher.aclose()
            if own_client and isinstance(backend, TritonVLMClient):
                await backend.close()

    app = FastAPI(title="tritonvlm OpenAI-compatible API", lifespan=lifespan)
    app.state.settings = settings
    app.state.client = backend
    app.state.media_fetcher = fetcher
    install_exception_handlers(app)
    app.add_middleware(AccessLogMiddleware)

    @app.get("/health")
    async def health() -> Response:
        """200 when Triton and the ``vlm`` model are ready, 503 otherwise."""
        if await backend.is_ready():
            return JSONResponse({"status": "ok"})
        error = APIError(503, "The inference server or its model is not ready.", code="service_unavailable")
        return error.to_response()

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

    async def start(body: ChatCompletionRequest, request_id: str) -> AsyncIterator[StreamDelta]:
        """Everything before the Triton call: conversion, limits, images, parameters."""
        messages, image_refs = to_wire_messages(body.messages)
        if len(image_refs) > settings.max_images_per_request:
            raise APIError(
                400,
                f"Too many images: {len(image_refs)} "
                f"(at most {settings.max_images_per_request} per request).",
                param="messages",
                code="too_many_images",
            )
        images = await fetcher.fetch_all(image_refs)
        parameters = build_parameters(body)
        logger.debug(
            "request %s: %d messages, %d images, parameters %s",
            request_id,
            len(messages),
            len(images),
            parameters,
        )
        return backend.stream(messages, images, parameters, request_id)

    async def complete(body: ChatCompletionRequest, request_id: str) -> ChatCompletion:
        deltas = await start(body, request_id)
        return await collect_completion(deltas, request_id=request_id, model=settings.served_model_name)

    async def open_stream(
        body: ChatCompletionRequest, request_id: str
    ) -> tuple[StreamDelta | None, AsyncIterator[StreamDelta]]:
        deltas = await start(body, request_id)
        try:
            first = await anext(deltas, None)
        except BaseException:
            await deltas.aclose()  # type: ignore[attr-defined]
            raise
        return first, deltas

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Create a chat completion, whole or streamed as server-sent events."""
        request_id = getattr(request.state, "request_id", None) or new_request_id()
        _check_request(body, settings)
        try:
            if not body.stream:
                completion = await run_until_disconnect(request.receive, complete(body, request_id))
                return JSONResponse(completion.model_dump(mode="json"))
            first, deltas = await run_until_disconnect(request.receive, open_stream(body, request_id))
        except ClientDisconnected:
            request.state.outcome = "client disconnected"
            return _ClientGoneResponse()
        except APIError:
            raise
        except Exception as exc:
            error = to_api_error(exc)
            if error.code == "internal_error":
                raise  # the app-wide handler logs it and answers 500
            logger.warning("request %s failed: %s %s", request_id, error.status_code, error.message)
            raise error from None
        events = stream_events(
            first,
            deltas,
            request_id=request_id,
            model=settings.served_model_name,
            include_usage=body.include_usage,
            state=request.scope.setdefault("state", {}),
        )
        return SSEResponse(events)

    return app
