"""Tests for tritonvlm.frontend.triton_client against an in-process gRPC server.

The server implements Triton's ``GRPCInferenceService`` (the protobuf service tritonclient ships),
so the real ``tritonclient.grpc.aio`` client, gRPC transport and tensor (de)serialisation are
exercised: tensors sent, outputs parsed, the final-response flag, errors, and — the point of this
file — that stopping the consumer cancels the gRPC call (the server sees its call cancelled).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from tritonvlm import wire
from tritonvlm.frontend.triton_client import (
    StreamDelta,
    TritonRequestError,
    TritonUnavailableError,
    TritonVLMClient,
    build_inputs,
)
from tritonvlm.launcher import free_ports


def _bytes_raw(values: list[bytes]) -> bytes:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    serialized = serialize_byte_tensor(array)
    return serialized.item() if serialized.dtype == object else serialized.tobytes()


def _response(
    request_id: str,
    *,
    text: str | None = None,
    ids: list[int] | None = None,
    finish: str = "",
    prompt: int = 7,
    completion: int = 0,
    final: bool = False,
    logprobs: str | None = None,
) -> service_pb2.ModelStreamInferResponse:
    """A vlm response; ``text=None`` makes an empty one (no outputs). ``logprobs``: the LOGPROBS output
    (left out when ``None``, as a server without it would)."""
    resp = service_pb2.ModelInferResponse(model_name=wire.VLM_MODEL, id=request_id)
    if text is not None:
        tensors = [
            (wire.TEXT_DELTA, "BYTES", [1], _bytes_raw([text.encode()])),
            (wire.TOKEN_IDS, "INT64", [len(ids or [])], np.asarray(ids or [], dtype=np.int64).tobytes()),
            (wire.FINISH_REASON, "BYTES", [1], _bytes_raw([finish.encode()])),
            (wire.PROMPT_TOKENS, "INT32", [1], np.asarray([prompt], dtype=np.int32).tobytes()),
            (wire.COMPLETION_TOKENS, "INT32", [1], np.asarray([completion], dtype=np.int32).tobytes()),
        ]
        if logprobs is not None:
            tensors.append((wire.LOGPROBS, "BYTES", [1], _bytes_raw([logprobs.encode()])))
        for name, datatype, shape, raw in tensors:
            out = resp.outputs.add()
            out.name, out.datatype = name, datatype
            out.shape.extend(shape)
            resp.raw_output_contents.append(raw)
    resp.parameters["triton_final_response"].bool_param = final
    return service_pb2.ModelStreamInferResponse(infer_response=resp)


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ``vlm`` stream requests according to ``PARAMETERS["scenario"]``; records what it saw."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self.model_ready = True
        self.index: list[tuple[str, str]] = [(wire.VLM_MODEL, "READY"), (wire.PREPROCESS_MODEL, "READY")]

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        models = [service_pb2.RepositoryIndexResponse.ModelIndex(name=n, state=st) for n, st in self.index]
        return service_pb2.RepositoryIndexResponse(models=models)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=self.model_ready and request.name == wire.VLM_MODEL)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        try:
            async for request in request_iterator:
                decoded = {
                    t.name: (
                        [bytes(x) for x in deserialize_bytes_tensor(raw)]
                        if t.datatype == "BYTES"
                        else np.frombuffer(raw, dtype=np.int64).tolist()
                    )
                    for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
                }
                self.requests.append(
                    {"model": request.model_name, "id": request.id, "inputs": decoded, "request": request}
                )
                params = json.loads(decoded[wire.PARAMETERS][0])
                async for response in self._scenario(params.get("scenario", "normal"), request.id):
                    yield response
                if params.get("scenario") in ("close_early", "ends_after_finish"):
                    return
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.finished.set()

    async def _scenario(self, scenario: str, rid: str) -> AsyncIterator[Any]:
        if scenario == "normal":  # outputs on every step, then an empty final response
            yield _response(rid, text="Hel", ids=[1, 2], completion=2)
            yield _response(rid, text="lo", ids=[3], completion=3)
            yield _response(rid, text="", ids=[4], finish="stop", completion=4)
            yield _response(rid, final=True)
        elif scenario == "logprobs":
            entry = {"token": "a", "logprob": -0.25, "bytes": [97], "top_logprobs": []}
            yield _response(rid, text="a", ids=[1], completion=1, logprobs=json.dumps([entry]))
            yield _response(rid, text="", ids=[2], finish="stop", completion=2, logprobs="")
            yield _response(rid, final=True)
        elif scenario == "final_then_linger":  # Triton ends the stream a moment after the final response
            yield _response(rid, text="ok", ids=[1], finish="stop", completion=1, final=True)
            await asyncio.sleep(0.3)
        elif scenario == "final_with_outputs":
            yield _response(rid, text="é", ids=[9], finish="length", completion=1, final=True)
            yield _response(rid, text="never read", ids=[10], completion=2)
        elif scenario == "client_error":
            yield service_pb2.ModelStreamInferResponse(
                error_message="in model 'vlm': [invalid_request] image 2 is not an image (param: images[1])"
            )
        elif scenario == "internal_error":
            yield service_pb2.ModelStreamInferResponse(error_message="engine thread died")
        elif scenario == "stub_died":  # what Triton answers once a Python model's stub process crashed
            yield service_pb2.ModelStreamInferResponse(error_message="Stub process 'vlm_0_0' is not healthy.")
        elif scenario == "close_early":
            yield _response(rid, text="a", ids=[1], completion=1)
        elif scenario == "ends_after_finish":  # no final flag, but the stream ends after the last step
            yield _response(rid, text="a", ids=[1], finish="stop", completion=1)
        elif scenario == "stall":  # one response, then nothing: what a request gets once its stub died
            yield _response(rid, text="a", ids=[1], completion=1)
            await asyncio.sleep(3600)
        elif scenario == "forever":
            step = 0
            while True:
                step += 1
                yield _response(rid, text=f"t{step} ", ids=[step], completion=step)
                await asyncio.sleep(0.01)
        else:
            raise AssertionError(scenario)


async def _with_server(
    body: Callable[[FakeTriton, TritonVLMClient], Awaitable[None]], **client_kwargs: Any
) -> FakeTriton:
    fake = FakeTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = TritonVLMClient(f"127.0.0.1:{port}", **client_kwargs)
    try:
        await asyncio.wait_for(body(fake, client), 10)
    finally:
        await client.close()
        await server.stop(grace=None)
    return fake


async def _collect(stream: AsyncIterator[StreamDelta]) -> list[StreamDelta]:
    return [delta async for delta in stream]


MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it? ü"}]}]


def test_build_inputs_omits_images_when_none() -> None:
    names = [t.name() for t in build_inputs([{"role": "user", "content": "hi"}], [], {})]
    assert names == [wire.MESSAGES, wire.PARAMETERS]
    names = [t.name() for t in build_inputs([], [b"\x89PNG", b"\xff\xd8\xff"], {})]
    assert names == [wire.MESSAGES, wire.IMAGES, wire.PARAMETERS]


def test_build_inputs_prompt_forms() -> None:
    text = build_inputs(None, prompt="Once upon", parameters={"max_tokens": 3})
    assert [(t.name(), t.datatype()) for t in text] == [(wire.PROMPT, "BYTES"), (wire.PARAMETERS, "BYTES")]
    ids = build_inputs(None, prompt_ids=[5, 6, 7])
    assert [(t.name(), t.datatype(), t.shape()) for t in ids][0] == (wire.INPUT_IDS, "INT64", [3])
    for bad in ({}, {"prompt": "x", "prompt_ids": [1]}):
        with pytest.raises(ValueError):
            build_inputs(None, **bad)
    with pytest.raises(ValueError):
        build_inputs([{"role": "user", "content": "x"}], prompt="x")
    with pytest.raises(ValueError):
        build_inputs(None, [b"img"], prompt="x")


def test_stream_prompt_and_prompt_ids_reach_triton() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        await _collect(
            client.stream(prompt="Once upon ü", parameters={"scenario": "normal"}, request_id="c1")
        )
        await _collect(client.stream(None, (), {"scenario": "normal"}, "c2", prompt_ids=[3, 1, 4]))

    fake = asyncio.run(_with_server(body))
    first, second = fake.requests
    assert first["inputs"][wire.PROMPT] == ["Once upon ü".encode()] and wire.MESSAGES not in first["inputs"]
    assert second["inputs"][wire.INPUT_IDS] == [3, 1, 4] and second["id"] == "c2"


def test_logprobs_output_is_parsed() -> None:
    seen: list[StreamDelta] = []

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        seen.extend(await _collect(client.stream(MESSAGES, [], {"scenario": "logprobs"}, "lp")))

    asyncio.run(_with_server(body))
    assert seen[0].logprobs == [{"token": "a", "logprob": -0.25, "bytes": [97], "top_logprobs": []}]
    assert seen[1].logprobs is None  # "" means not asked / nothing to report


def test_stream_sends_wire_request_and_parses_responses() -> None:
    seen: list[StreamDelta] = []

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        assert await client.is_ready()
        params = {"max_tokens": 5, "temperature": 0.0, "scenario": "normal"}
        seen.extend(await _collect(client.stream(MESSAGES, [b"img-one", b"img-two"], params, "chatcmpl-abc")))

    fake = asyncio.run(_with_server(body))
    assert [d.text for d in seen] == ["Hel", "lo", ""]
    assert [d.token_ids for d in seen] == [[1, 2], [3], [4]]
    assert [d.finish_reason for d in seen] == [None, None, "stop"]
    assert seen[-1].prompt_tokens == 7 and seen[-1].completion_tokens == 4
    (req,) = fake.requests
    assert req["model"] == wire.VLM_MODEL and req["id"] == "chatcmpl-abc"
    assert json.loads(req["inputs"][wire.MESSAGES][0]) == MESSAGES
    assert req["inputs"][wire.IMAGES] == [b"img-one", b"img-two"]
    assert json.loads(req["inputs"][wire.PARAMETERS][0]) == {
        "max_tokens": 5,
        "temperature": 0.0,
        "scenario": "normal",
    }
    assert [o.name for o in req["request"].outputs] == list(wire.STREAM_OUTPUTS)
    # Triton drops an output-less final response unless asked for it (seen with tritonserver 2.51).
    assert req["request"].parameters["triton_enable_empty_final_response"].bool_param is True
    assert not fake.cancelled.is_set()


def test_stream_without_images_sends_no_images_tensor() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        await _collect(client.stream([{"role": "user", "content": "hi"}], [], {}, "r1"))

    fake = asyncio.run(_with_server(body))
    assert wire.IMAGES not in fake.requests[0]["inputs"]


def test_stream_stops_after_final_response_with_outputs() -> None:
    seen: list[StreamDelta] = []

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        seen.extend(await _collect(client.stream(MESSAGES, [], {"scenario": "final_with_outputs"}, "r2")))

    asyncio.run(_with_server(body))
    assert [(d.text, d.finish_reason, d.completion_tokens) for d in seen] == [("é", "length", 1)]


def test_client_error_becomes_triton_request_error_with_param() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        with pytest.raises(TritonRequestError) as info:
            await _collect(client.stream(MESSAGES, [], {"scenario": "client_error"}, "r3"))
        assert info.value.client_error is True
        assert info.value.message == "image 2 is not an image"
        assert info.value.param == "images[1]"

    asyncio.run(_with_server(body))


def test_internal_error_is_not_a_client_error() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        with pytest.raises(TritonRequestError) as info:
            await _collect(client.stream(MESSAGES, [], {"scenario": "internal_error"}, "r4"))
        assert info.value.client_error is False
        assert "engine thread died" in info.value.message and info.value.param is None

    asyncio.run(_with_server(body))


def test_a_finished_stream_is_closed_by_triton_not_cancelled() -> None:
    """Cancelling right after the final response raced Triton closing the stream and kept the vlm
    model referenced in Triton (it then never unloaded): a finished stream is read to its end."""

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        deltas = await _collect(client.stream(MESSAGES, [], {"scenario": "final_then_linger"}, "r11"))
        assert [(d.text, d.finish_reason) for d in deltas] == [("ok", "stop")]
        assert not fake.finished.is_set()  # the consumer got its answer before the stream ended
        await asyncio.wait_for(fake.finished.wait(), 3)

    fake = asyncio.run(_with_server(body))
    assert not fake.cancelled.is_set()


def test_dead_stub_is_unavailable_not_internal() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        with pytest.raises(TritonUnavailableError, match="not healthy"):
            await _collect(client.stream(MESSAGES, [], {"scenario": "stub_died"}, "r10"))

    asyncio.run(_with_server(body))


def test_stream_closed_without_final_response_is_an_error() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        with pytest.raises(TritonRequestError, match="before the final response"):
            await _collect(client.stream(MESSAGES, [], {"scenario": "close_early"}, "r5"))

    asyncio.run(_with_server(body))


def test_stream_that_ends_after_the_finishing_step_is_complete() -> None:
    seen: list[StreamDelta] = []

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        seen.extend(await _collect(client.stream(MESSAGES, [], {"scenario": "ends_after_finish"}, "r9")))

    asyncio.run(_with_server(body))
    assert [(d.text, d.finish_reason) for d in seen] == [("a", "stop")]


def test_model_not_ready() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        fake.model_ready = False
        assert not await client.is_ready()

    asyncio.run(_with_server(body))


def test_unreachable_triton() -> None:
    async def body() -> None:
        client = TritonVLMClient(f"127.0.0.1:{free_ports(1)[0]}", ready_timeout_s=1.0)
        try:
            assert not await client.is_ready()
            with pytest.raises(TritonUnavailableError):
                await _collect(client.stream(MESSAGES, [], {}, "r6"))
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def _keep_response_iterators_alive(client: TritonVLMClient, kept: list[Any]) -> None:
    """Hold every stream_infer iterator so that garbage collection cannot be what cancels the call."""
    grpc_client = client._get_client()
    original = grpc_client.stream_infer

    def stream_infer(*args: Any, **kwargs: Any) -> Any:
        iterator = original(*args, **kwargs)
        kept.append(iterator)
        return iterator

    grpc_client.stream_infer = stream_infer  # type: ignore[method-assign]


def test_closing_the_generator_cancels_the_grpc_call() -> None:
    kept: list[Any] = []

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        _keep_response_iterators_alive(client, kept)
        stream = client.stream(MESSAGES, [], {"scenario": "forever"}, "r7")
        first = await stream.__anext__()
        second = await stream.__anext__()
        assert (first.text, second.text) == ("t1 ", "t2 ")
        await stream.aclose()  # what StreamingResponse / aclosing() do when the HTTP client leaves
        await asyncio.wait_for(fake.cancelled.wait(), 3)

    fake = asyncio.run(_with_server(body))
    assert fake.cancelled.is_set() and len(kept) == 1


def test_cancelling_the_consumer_task_cancels_the_grpc_call() -> None:
    kept: list[Any] = []

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        _keep_response_iterators_alive(client, kept)
        got: list[str] = []

        async def consume() -> None:
            async for delta in client.stream(MESSAGES, [], {"scenario": "forever"}, "r8"):
                got.append(delta.text)

        task = asyncio.ensure_future(consume())
        while len(got) < 3:
            await asyncio.sleep(0.005)
        task.cancel()  # e.g. the HTTP handler cancelled on disconnect, awaiting the next response
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(fake.cancelled.wait(), 3)

    fake = asyncio.run(_with_server(body))
    assert fake.cancelled.is_set()


def test_an_error_response_ends_the_stream_without_a_cancel() -> None:
    """An error is vlm's final response: the stream is left for Triton to close, like a finished one
    (a cancel right after it can keep vlm referenced in Triton 2.51, which then never unloads)."""

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        with pytest.raises(TritonRequestError):
            await _collect(client.stream(MESSAGES, [], {"scenario": "client_error"}, "r12"))
        await asyncio.wait_for(fake.finished.wait(), 3)

    fake = asyncio.run(_with_server(body))
    assert not fake.cancelled.is_set()


def test_a_model_of_the_repository_not_ready_makes_the_pipeline_not_ready() -> None:
    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        assert await client.is_ready()
        fake.index = [(wire.VLM_MODEL, "READY"), (wire.PREPROCESS_MODEL, "UNAVAILABLE")]
        assert not await client.is_ready()
        fake.index = [(wire.VLM_MODEL, "READY"), ("never_loaded", "")]  # explicit mode, not loaded: ignored
        assert await client.is_ready()

    asyncio.run(_with_server(body))


def test_a_stream_left_waiting_by_a_dead_pipeline_fails_with_unavailable() -> None:
    """A stub killed mid-request never answers again: once the pipeline is seen not ready, the idle
    stream fails (503) and its gRPC call is cancelled, instead of hanging its client."""

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        got: list[str] = []

        async def consume() -> None:
            async for delta in client.stream(MESSAGES, [], {"scenario": "stall"}, "r13"):
                got.append(delta.text)

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.6)  # idle, but the pipeline is ready: a queued request, left alone
        assert not task.done() and got == ["a"]
        fake.index = [(wire.VLM_MODEL, "READY"), (wire.PREPROCESS_MODEL, "UNAVAILABLE")]
        await asyncio.sleep(0.6)  # a stage behind vlm being reloaded does not strand vlm's streams
        assert not task.done()
        fake.model_ready = False  # vlm itself is down: its streams will never be answered
        with pytest.raises(TritonUnavailableError, match="stopped answering"):
            await asyncio.wait_for(task, 3)
        await asyncio.wait_for(fake.cancelled.wait(), 3)

    asyncio.run(_with_server(body, stall_check_s=0.2))


def test_a_stream_that_lived_through_an_outage_fails_even_after_recovery() -> None:
    """The model came back (reloaded) between two looks at an idle stream: the stream still waits on the
    dead process, so having seen the outage is enough."""

    async def body(fake: FakeTriton, client: TritonVLMClient) -> None:
        stream = client.stream(MESSAGES, [], {"scenario": "stall"}, "r14")
        assert (await stream.__anext__()).text == "a"
        fake.model_ready = False
        assert not await client.is_ready()  # e.g. a /health probe saw the reload
        fake.model_ready = True
        with pytest.raises(TritonUnavailableError):
            await asyncio.wait_for(stream.__anext__(), 3)
        # a stream that began after the outage is not affected
        late = client.stream(MESSAGES, [], {"scenario": "normal"}, "r15")
        assert [d.text for d in await _collect(late)] == ["Hel", "lo", ""]

    asyncio.run(_with_server(body, stall_check_s=0.2))
