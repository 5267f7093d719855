"""Async gRPC client for the decoupled Triton model ``vlm`` (contract: :mod:`tritonvlm.wire`).

Each :meth:`TritonVLMClient.stream` call opens its own bidirectional gRPC stream, sends one request
and yields one :class:`StreamDelta` per response until the response flagged
``triton_final_response``. When the consumer stops early (``aclose()`` of the generator, or the task
awaiting it is cancelled, e.g. because the HTTP client went away) the gRPC call is cancelled
explicitly: tritonclient's ``stream_infer`` returns a plain iterator object (not an async
generator) whose only way to stop the call is its ``cancel()`` method, so the ``finally`` block
of :meth:`TritonVLMClient.stream` calls it. Triton then flags the request cancelled and the ``vlm``
model tells the engine to drop it.

A stream whose Python stub died never gets another response from Triton 2.51 (its python backend
neither restarts a dead stub nor fails the requests it held). So a :class:`StallMonitor` looks at the
open streams once a second: when some stream has had no response for that long, it checks that
Triton and the ``vlm`` model (which holds the streams) are ready, and fails (with
:class:`TritonUnavailableError`, a 503) each idle stream that began before ``vlm`` was last seen not
ready. A dead stage behind ``vlm`` (preprocess, vision_encoder) needs no such help: ``vlm``'s call to
it fails after about a second, and that error reaches the client. ``serve`` brings a
model whose stub died back by unloading and loading it (:class:`tritonvlm.launcher.StubWatchdog`),
so such a model is seen not ready for the seconds that takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from tritonvlm import wire

logger = logging.getLogger("tritonvlm.frontend.triton_client")

FINAL_RESPONSE_PARAMETER = "triton_final_response"
# Without this request parameter Triton's gRPC stream drops a final response that carries no outputs
# (a decoupled model's ``send(flags=FINAL)``), and the client never learns that the request is over
# unless the stream is half-closed and ends. Verified against tritonserver 2.51.
ENABLE_EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"
# Triton's messages for a model that is missing, not loaded, or whose Python stub process died
# (answered as unavailable, 503, not as 500).
_MODEL_UNAVAILABLE_MARKERS = (
    "unknown model",
    "is not ready",
    "has no available versions",
    "is not healthy",
)
# gRPC waits longer and longer between reconnection attempts (up to 120 s by default) while the server
# is down, and calls fail at once in between: capped, a Triton that comes back (restarted, or a
# Kubernetes Service's new pod) is used, and /health turns 200, within about a second.
_RECONNECT_BACKOFF_MS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 1000))


# How long a stream may go without a response before the monitor checks that the pipeline is alive,
# and how long a readiness answer is reused (many idle streams, one check).
STALL_CHECK_S = 1.0
_READY_CACHE_S = 0.5
_STALLED_MESSAGE = (
    "The inference pipeline stopped answering this request (a model process of the server failed and "
    "is being restarted). Retry the request."
)

# How long a finished stream may take to be closed by Triton before it is cancelled.
_DRAIN_TIMEOUT_S = 5.0
_draining: set[asyncio.Task] = set()  # keeps the drain tasks referenced until they are done


def _close_after_final(responses: Any) -> None:
    """Let a stream whose final response arrived end on Triton's side, in the background.

    Cancelling the gRPC call right after the final response races Triton 2.51 closing the stream,
    and a stream cancelled in that window can leave the ``vlm`` model referenced in Triton: it then
    never unloads on shutdown. Reading the stream to its end (Triton closes it at once) avoids that;
    the call is cancelled only if that takes longer than ``_DRAIN_TIMEOUT_S``.
    """

    async def drain() -> None:
        try:
            await asyncio.wait_for(_read_to_end(responses), _DRAIN_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a stream that fails here is over either way
            pass
        finally:
            responses.cancel()

    task = asyncio.get_running_loop().create_task(drain())
    _draining.add(task)
    task.add_done_callback(_draining.discard)


async def _read_to_end(responses: Any) -> None:
    while True:
        try:
            await responses.__anext__()
        except StopAsyncIteration:
            return


@dataclass(eq=False)  # hashed by identity: kept in a set
class _OpenStream:
    responses: Any
    started: float
    last_activity: float
    failure: str | None = None


class StallMonitor:
    """Fails the streams a dead model process left waiting (see the module docstring).

    One task per event loop, running only while streams are open. ``check`` says whether the pipeline is
    ready; ``last_unhealthy`` when it was last seen not ready (``-inf``: never).
    """

    def __init__(
        self,
        check: Callable[[], Awaitable[bool]],
        last_unhealthy: Callable[[], float],
        interval_s: float = STALL_CHECK_S,
    ) -> None:
        self._check = check
        self._last_unhealthy = last_unhealthy
        self.interval_s = interval_s
        self._open: set[_OpenStream] = set()
        self._task: asyncio.Task | None = None

    def register(self, responses: Any) -> _OpenStream:
        """Watch a stream from now on; :meth:`touch` it on each response, :meth:`unregister` it at its end."""
        now = time.monotonic()
        stream = _OpenStream(responses, now, now)
        self._open.add(stream)
        if self.interval_s > 0 and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())
        return stream

    @staticmethod
    def touch(stream: _OpenStream) -> None:
        stream.last_activity = time.monotonic()

    def unregister(self, stream: _OpenStream) -> None:
        self._open.discard(stream)

    async def _run(self) -> None:
        while self._open:
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            idle = [s for s in self._open if now - s.last_activity >= self.interval_s and s.failure is None]
            if not idle:
                continue
            try:
                ready = await self._check()
            except Exception:  # noqa: BLE001 - the check itself failing is "not ready"
                ready = False
            last_unhealthy = now if not ready else self._last_unhealthy()
            for stream in idle:
                if stream.started <= last_unhealthy:
                    logger.warning(
                        "failing a stream left waiting by the pipeline (no response for %.1fs)",
                        now - stream.last_activity,
                    )
                    stream.failure = _STALLED_MESSAGE
                    stream.responses.cancel()


def channel_options() -> list[tuple[str, int]]:
    """tritonclient's default channel options (message sizes, keepalive) plus a capped reconnect backoff."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        *_RECONNECT_BACKOFF_MS,
    ]


@dataclass
class StreamDelta:
    """What one ``vlm`` response adds: new text and token ids, and the running token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None  # one OpenAI logprobs entry per token, when asked
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache


class TritonRequestError(Exception):
    """Triton answered the request with an error; ``client_error`` when the client's input is at fault."""

    def __init__(self, client_error: bool, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.client_error = client_error
        self.message = message
        self.param = param

    @classmethod
    def from_wire(cls, message: str) -> TritonRequestError:
        """Build from an error message as Triton returned it (see :func:`wire.parse_wire_error`)."""
        client_error, text, param = wire.parse_wire_error(message)
        return cls(client_error, text, param)


class TritonUnavailableError(Exception):
    """Triton cannot be reached, or the ``vlm`` model is not loaded."""


class TritonStalledError(TritonUnavailableError):
    """A stream was left waiting by a ``vlm`` that died (its message says so to the client)."""


def _grpc_target(url: str) -> str:
    for prefix in ("grpc://", "http://"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


def _bytes_input(name: str, values: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
    array = np.empty(len(values), dtype=object)
    array[:] = values
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(
    messages: list[dict[str, Any]] | None,
    images: Sequence[bytes] = (),
    parameters: dict[str, Any] | None = None,
    *,
    prompt: str | None = None,
    prompt_ids: Sequence[int] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[grpcclient.InferInput]:
    """The ``vlm`` input tensors for exactly one prompt form: ``MESSAGES`` (chat, with ``IMAGES`` when
    there are images and ``TOOLS`` when there are tools), ``PROMPT`` (raw text) or ``INPUT_IDS``."""
    forms = sum(x is not None for x in (messages, prompt, prompt_ids))
    if forms != 1:
        raise ValueError("give exactly one of messages, prompt or prompt_ids")
    if images and messages is None:
        raise ValueError("images go with messages only")
    if messages is not None:
        inputs = [_bytes_input(wire.MESSAGES, [json.dumps(messages).encode("utf-8")])]
    elif prompt is not None:
        inputs = [_bytes_input(wire.PROMPT, [prompt.encode("utf-8")])]
    else:
        ids = np.asarray(list(prompt_ids or ()), dtype=np.int64)
        tensor = grpcclient.InferInput(wire.INPUT_IDS, [int(ids.shape[0])], "INT64")
        tensor.set_data_from_numpy(ids)
        inputs = [tensor]
    if images:
        inputs.append(_bytes_input(wire.IMAGES, list(images)))
    if tools and messages is not None:
        inputs.append(_bytes_input(wire.TOOLS, [json.dumps(tools).encode("utf-8")]))
    inputs.append(_bytes_input(wire.PARAMETERS, [json.dumps(parameters or {}).encode("utf-8")]))
    return inputs


def _first_scalar(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    return array.reshape(-1)[0]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace")
    return str(value)


def _logprobs(value: Any) -> list[dict[str, Any]] | None:
    text = _text(value)
    if not text:
        return None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        logger.warning("ignoring a LOGPROBS output that is not JSON: %.80r", text)
        return None
    return entries if isinstance(entries, list) else None


def parse_response(result: Any, previous: StreamDelta | None = None) -> StreamDelta | None:
    """The :class:`StreamDelta` of one ``InferResult``; ``None`` if it carries no outputs.

    Token counts missing from a response are carried over from ``previous``.
    """
    if not result.get_response().outputs:
        return None
    ids = result.as_numpy(wire.TOKEN_IDS)
    prompt = _first_scalar(result, wire.PROMPT_TOKENS)
    completion = _first_scalar(result, wire.COMPLETION_TOKENS)
    cached = _first_scalar(result, wire.CACHED_TOKENS)
    return StreamDelta(
        text=_text(_first_scalar(result, wire.TEXT_DELTA)),
        token_ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        finish_reason=_text(_first_scalar(result, wire.FINISH_REASON)) or None,
        prompt_tokens=int(prompt) if prompt is not None else (previous.prompt_tokens if previous else 0),
        completion_tokens=(
            int(completion) if completion is not None else (previous.completion_tokens if previous else 0)
        ),
        logprobs=_logprobs(_first_scalar(result, wire.LOGPROBS)),
        cached_tokens=int(cached) if cached is not None else (previous.cached_tokens if previous else 0),
    )


def is_final_response(result: Any) -> bool:
    """Whether this response carries ``triton_final_response: true``."""
    parameters = result.get_response().parameters
    return FINAL_RESPONSE_PARAMETER in parameters and parameters[FINAL_RESPONSE_PARAMETER].bool_param


def _error_from_message(message: str) -> Exception:
    if (
        any(marker in message for marker in _MODEL_UNAVAILABLE_MARKERS)
        and wire.INVALID_REQUEST_MARKER not in message
    ):
        return TritonUnavailableError(message)
    return TritonRequestError.from_wire(message)


def _error_from_rpc(error: grpc.RpcError) -> Exception:
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return TritonUnavailableError(f"Triton is unavailable: {details}")
    return _error_from_message(details)


class TritonVLMClient:
    """Streams chat completions from the ``vlm`` model of a Triton server over gRPC."""

    def __init__(
        self,
        grpc_url: str,
        model_name: str = wire.VLM_MODEL,
        ready_timeout_s: float = 2.0,
        stall_check_s: float = STALL_CHECK_S,
    ) -> None:
        """``grpc_url`` is ``host:port`` (a ``grpc://`` prefix is accepted). ``stall_check_s``: how long a
        stream may wait for a response before the pipeline's readiness is checked (0: never)."""
        self.grpc_url = _grpc_target(grpc_url)
        self.model_name = model_name
        self.ready_timeout_s = ready_timeout_s
        self.stall_check_s = stall_check_s
        self._client: grpcclient.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: StallMonitor | None = None
        self._ready_cache: tuple[float, bool] | None = None
        self._last_unhealthy = float("-inf")  # monotonic time the pipeline was last seen not ready

    def _get_client(self) -> grpcclient.InferenceServerClient:
        # A grpc.aio channel belongs to the event loop it was made in: make it lazily, in that loop.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = grpcclient.InferenceServerClient(self.grpc_url, channel_args=channel_options())
            self._loop = loop
            self._monitor = StallMonitor(
                self._entry_ready_cached, lambda: self._last_unhealthy, self.stall_check_s
            )
        return self._client

    async def close(self) -> None:
        """Close the gRPC channel."""
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.close()

    async def is_ready(self) -> bool:
        """Whether the server is ready, the ``vlm`` model is ready, and so is every other model of the
        repository that has been loaded (a pipeline stage being reloaded is not ready). Never raises.

        The stall check looks at ``vlm`` alone: only a dead ``vlm`` leaves streams waiting (a dead stage
        behind it answers ``vlm``'s calls with an error, which reaches the client)."""
        entry_ready = ready = False
        try:
            client = self._get_client()
            timeout = self.ready_timeout_s
            entry_ready = bool(
                await client.is_server_ready(client_timeout=timeout)
                and await client.is_model_ready(self.model_name, client_timeout=timeout)
            )
            ready = entry_ready and await self._all_models_ready(client)
        except (InferenceServerException, grpc.RpcError, OSError) as exc:
            logger.debug("Triton readiness check failed: %s", exc)
        now = time.monotonic()
        self._ready_cache = (now, entry_ready)
        if not entry_ready:
            self._last_unhealthy = now
        return ready

    async def _all_models_ready(self, client: grpcclient.InferenceServerClient) -> bool:
        try:
            index = await client.get_model_repository_index(as_json=True, client_timeout=self.ready_timeout_s)
        except InferenceServerException as exc:
            if exc.status() == "StatusCode.UNIMPLEMENTED":  # a Triton-like server without the API
                return True
            raise
        for model in index.get("models", []):
            state = model.get("state", "")
            if state and state != "READY":  # "": never loaded (explicit model control), not ours
                logger.debug("model %s is %s: %s", model.get("name"), state, model.get("reason", ""))
                return False
        return True

    async def _entry_ready_cached(self) -> bool:
        """Whether ``vlm`` (the model that holds the streams) is ready, answered at most every 0.5 s."""
        cached = self._ready_cache
        if cached is None or time.monotonic() - cached[0] >= _READY_CACHE_S:
            await self.is_ready()
            cached = self._ready_cache
        assert cached is not None
        return cached[1]

    async def stream(
        self,
        messages: list[dict[str, Any]] | None = None,
        images: Sequence[bytes] = (),
        parameters: dict[str, Any] | None = None,
        request_id: str = "",
        *,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Run one completion; yield a :class:`StreamDelta` per non-empty response.

        The prompt is exactly one of ``messages`` (a chat, wire form, with ``images``), ``prompt`` (raw
        text, tokenized as is) or ``prompt_ids`` (token ids). Raises :class:`TritonRequestError` for an
        error response and :class:`TritonUnavailableError` when Triton cannot be reached. Closing the
        generator early cancels the gRPC call.
        """
        request = {
            "model_name": self.model_name,
            "inputs": build_inputs(
                messages, images, parameters, prompt=prompt, prompt_ids=prompt_ids, tools=tools
            ),
            "outputs": [grpcclient.InferRequestedOutput(name) for name in wire.STREAM_OUTPUTS],
            "request_id": request_id,
            "parameters": {ENABLE_EMPTY_FINAL_PARAMETER: True},
        }

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield request

        responses = self._get_client().stream_infer(inputs_iterator=one_request())
        monitor = self._monitor
        assert monitor is not None
        watched = monitor.register(responses)
        previous: StreamDelta | None = None
        final_seen = False
        try:
            while True:
                try:
                    result, error = await responses.__anext__()
                except StopAsyncIteration:
                    if previous is not None and previous.finish_reason:
                        return  # the stream ended after the last step: as good as a final response
                    raise TritonRequestError(
                        False, "Triton closed the stream before the final response"
                    ) from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if watched.failure is None or (task is not None and task.cancelling()):
                        raise  # our consumer was cancelled (e.g. its HTTP client left)
                    raise TritonStalledError(watched.failure) from None
                except grpc.RpcError as exc:
                    if watched.failure is not None:
                        raise TritonStalledError(watched.failure) from None
                    raise _error_from_rpc(exc) from None
                except InferenceServerException as exc:
                    raise _error_from_message(exc.message()) from None
                monitor.touch(watched)
                if error is not None:
                    final_seen = True  # an error ends the request: Triton closes the stream itself
                    raise _error_from_message(error.message())
                delta = parse_response(result, previous)
                if delta is not None:
                    previous = delta
                    yield delta
                if is_final_response(result):
                    final_seen = True
                    return
        finally:
            monitor.unregister(watched)
            # Ends the gRPC call whatever happened: after the final response (or an error, which is
            # final too), by letting Triton close the stream (in the background); otherwise by
            # cancelling it, which cancels the request when the consumer stopped early (GeneratorExit
            # at the ``yield``, CancelledError at the ``await``). Nothing here awaits, so a cancellation
            # is never delayed or swallowed.
            if final_seen and watched.failure is None:
                _close_after_final(responses)
            else:
                responses.cancel()
