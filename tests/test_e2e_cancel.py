"""Cancellation end to end: clients that drop their stream free their engine sequence at once."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from test_e2e import metric

pytestmark = pytest.mark.e2e

STREAMS = 16
DROPPED = 8
KEPT_TOKENS = 1500  # long enough to be seen running after the drop (the gauge refreshes every 250 ms)


def body(i: int, max_tokens: int) -> dict:
    return {
        "model": "tiny",
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Stream number {i}, tell me a long story."}],
    }


async def one_stream(client: httpx.AsyncClient, i: int, drop_after: int | None, go: asyncio.Event) -> dict:
    """Read a stream; a dropping client closes the connection after ``drop_after`` content chunks, once
    ``go`` says all the streams are decoding together."""
    chunks, finish, usage = 0, None, None
    max_tokens = 2000 if drop_after is not None else KEPT_TOKENS
    async with client.stream("POST", "/v1/chat/completions", json=body(i, max_tokens)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            choice = event["choices"][0] if event.get("choices") else None
            if choice and choice["delta"].get("content"):
                chunks += 1
            if choice and choice.get("finish_reason"):
                finish = choice["finish_reason"]
            if drop_after is not None and chunks >= drop_after:
                await go.wait()
                break  # leaving the context closes the connection mid-stream
    return {"chunks": chunks, "finish": finish, "usage": usage}


def running(server) -> float:
    return metric(server, "tritonvlm_engine_sequences", state="running")


def test_dropped_streams_leave_the_engine_and_the_rest_finish(server):
    cancelled_before = metric(server, "tritonvlm_engine_requests_total", outcome="cancelled")
    decode_before = metric(server, "tritonvlm_engine_tokens_total", phase="decode")

    async def scenario() -> tuple[list[dict], list[float]]:
        limits = httpx.Limits(max_connections=STREAMS * 2)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            go = asyncio.Event()
            tasks = [
                asyncio.create_task(one_stream(client, i, 10 if i < DROPPED else None, go))
                for i in range(STREAMS)
            ]
            # All 16 decode together before anyone leaves.
            seen = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (not seen or seen[-1] < STREAMS):
                seen.append(await asyncio.to_thread(running, server))
                await asyncio.sleep(0.02)
            go.set()
            await asyncio.gather(*tasks[:DROPPED])
            # After the drop: the gauge must fall to the 8 that remain while they are still decoding.
            after = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                after.append(await asyncio.to_thread(running, server))
                if after[-1] == STREAMS - DROPPED:
                    break
                await asyncio.sleep(0.02)
            results = await asyncio.gather(*tasks)
            return results, [max(seen), *after]

    results, gauge = asyncio.run(scenario())
    assert gauge[0] == STREAMS, f"the 16 streams never ran together: {gauge}"
    assert gauge[-1] == STREAMS - DROPPED, f"running sequences after the drop: {gauge[1:]}"
    kept = results[DROPPED:]
    assert all(r["finish"] == "length" and r["usage"]["completion_tokens"] == KEPT_TOKENS for r in kept), kept

    time.sleep(0.6)  # the engine's metrics refresh every 250 ms
    assert (
        metric(server, "tritonvlm_engine_requests_total", outcome="cancelled") - cancelled_before == DROPPED
    )
    # Had the dropped sequences kept decoding, they would have produced 8 x 2000 tokens.
    decoded = metric(server, "tritonvlm_engine_tokens_total", phase="decode") - decode_before
    assert decoded < DROPPED * KEPT_TOKENS + DROPPED * 1000, decoded  # each dropped one: < 1000 of its 2000
    assert running(server) == 0
