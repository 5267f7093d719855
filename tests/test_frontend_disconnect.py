"""A client that disconnects must stop the Triton stream (so that its gRPC call is cancelled).

The app is driven at the ASGI level, as uvicorn drives it (ASGI spec 2.3: ``http.disconnect`` comes
through ``receive``), with a fake Triton client whose stream never ends and records how it was
stopped. The fake keeps a reference to every stream so that only an explicit close, not garbage
collection, can finalise it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tritonvlm.frontend.app import FrontendSettings, create_app
from tritonvlm.frontend.disconnect import ClientDisconnected, run_until_disconnect
from tritonvlm.frontend.triton_client import StreamDelta

MODEL = "m"


class EndlessClient:
    """Yields a delta every few milliseconds (after ``delay_first`` seconds) until stopped."""

    def __init__(self, delay_first: float = 0.0) -> None:
        self.delay_first = delay_first
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stopped_by: str | None = None
        self.yielded = 0
        self.streams: list[Any] = []

    async def is_ready(self) -> bool:
        return True

    def stream(
        self, messages: Any, images: Any, parameters: Any, request_id: str
    ) -> AsyncIterator[StreamDelta]:
        generator = self._stream()
        self.streams.append(generator)
        return generator

    async def _stream(self) -> AsyncIterator[StreamDelta]:
        self.started.set()
        try:
            await asyncio.sleep(self.delay_first)
            while True:
                self.yielded += 1
                yield StreamDelta(f"t{self.yielded} ", [self.yielded], None, 4, self.yielded)
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.stopped_by = "cancelled"
            raise
        except GeneratorExit:
            self.stopped_by = "closed"
            raise
        finally:
            self.stopped.set()


def _scope(payload: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def _drive(
    client: EndlessClient,
    request: dict[str, Any],
    *,
    disconnect_after_chunks: int | None,
    delay: float = 0.0,
    block_writes: bool = False,
) -> list[dict[str, Any]]:
    """Run one request; the client disconnects after N body chunks (stream) or ``delay`` seconds.

    ``block_writes``: the send of chunk N blocks (a full socket buffer) as the client goes, so the
    response is cancelled inside ``send`` while the body generator waits at a ``yield``.
    """
    app = create_app(FrontendSettings(served_model_name=MODEL), client=client)
    payload = json.dumps(request).encode()
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": payload, "more_body": False}
        if disconnect_after_chunks is None:
            await asyncio.sleep(delay)
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            return  # as uvicorn does once the client is gone
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after_chunks is not None and len(chunks) >= disconnect_after_chunks:
            gone.set()
            if block_writes:
                await asyncio.sleep(3600)

    await asyncio.wait_for(app(_scope(payload), receive, send), 5)
    return sent


def _request(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "go on forever"}], "stream": stream}


def test_disconnect_mid_stream_stops_the_triton_stream(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> EndlessClient:
        client = EndlessClient()
        sent = await _drive(client, _request(stream=True), disconnect_after_chunks=4)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
        await asyncio.wait_for(client.stopped.wait(), 1)  # not left to the garbage collector
        return client

    with caplog.at_level(logging.INFO, logger="tritonvlm.frontend.access"):
        client = asyncio.run(run())
    assert client.stopped_by in ("closed", "cancelled")
    assert client.yielded < 50
    assert "POST /v1/chat/completions 200" in caplog.text and "(client disconnected)" in caplog.text


def test_disconnect_while_a_write_is_blocked_closes_the_triton_stream() -> None:
    async def run() -> EndlessClient:
        client = EndlessClient()
        await _drive(client, _request(stream=True), disconnect_after_chunks=3, block_writes=True)
        await asyncio.wait_for(client.stopped.wait(), 1)
        return client

    client = asyncio.run(run())
    assert client.stopped_by == "closed"


def test_disconnect_before_first_token_stops_the_triton_stream() -> None:
    async def run() -> EndlessClient:
        client = EndlessClient(delay_first=30.0)  # e.g. a long prefill or a full queue
        sent = await _drive(client, _request(stream=True), disconnect_after_chunks=None, delay=0.1)
        assert not any(m["type"] == "http.response.body" and m.get("body") for m in sent)
        await asyncio.wait_for(client.stopped.wait(), 1)
        return client

    client = asyncio.run(run())
    assert client.started.is_set() and client.stopped_by == "cancelled" and client.yielded == 0


def test_disconnect_during_non_stream_completion_stops_the_triton_stream() -> None:
    async def run() -> EndlessClient:
        client = EndlessClient()
        await _drive(client, _request(stream=False), disconnect_after_chunks=None, delay=0.1)
        await asyncio.wait_for(client.stopped.wait(), 1)
        return client

    client = asyncio.run(run())
    assert client.stopped_by == "cancelled" and client.yielded > 0


def test_run_until_disconnect_returns_work_result_and_stops_watching() -> None:
    async def run() -> None:
        receive_cancelled = asyncio.Event()

        async def receive() -> dict[str, Any]:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                receive_cancelled.set()
                raise
            return {"type": "http.disconnect"}

        async def work() -> int:
            await asyncio.sleep(0.01)
            return 42

        assert await run_until_disconnect(receive, work()) == 42
        assert receive_cancelled.is_set()

    asyncio.run(run())


def test_run_until_disconnect_cancels_work() -> None:
    async def run() -> None:
        work_cancelled = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def work() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                work_cancelled.set()
                raise

        try:
            await run_until_disconnect(receive, work())
        except ClientDisconnected:
            pass
        else:
            raise AssertionError("expected ClientDisconnected")
        assert work_cancelled.is_set()

    asyncio.run(run())


class EndlessChoices(EndlessClient):
    """Like EndlessClient, but counts the streams that stopped (one per choice)."""

    def __init__(self) -> None:
        super().__init__()
        self.stops: list[str] = []

    async def _stream(self) -> AsyncIterator[StreamDelta]:
        try:
            while True:
                self.yielded += 1
                yield StreamDelta("x ", [1], None, 4, self.yielded)
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.stops.append("cancelled")
            raise
        except GeneratorExit:
            self.stops.append("closed")
            raise


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_every_choice_of_n(stream: bool) -> None:
    async def run() -> EndlessChoices:
        client = EndlessChoices()
        request = {**_request(stream=stream), "n": 3}
        if stream:
            await _drive(client, request, disconnect_after_chunks=6)
        else:
            await _drive(client, request, disconnect_after_chunks=None, delay=0.1)
        for _ in range(100):
            if len(client.stops) == 3:
                break
            await asyncio.sleep(0.01)
        return client

    client = asyncio.run(run())
    assert len(client.streams) == 3 and len(client.stops) == 3
