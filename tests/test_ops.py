"""Operations end to end: both processes' Prometheus metrics, one request id in both logs, /health
following a Triton that goes away and comes back (``--triton-url``), and Ctrl-C during streams."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, make_image

from tritonvlm.cli import DEFAULT_MODEL_REPOSITORY
from tritonvlm.launcher import TritonServer, free_ports

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)(?: \d+)?")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus page, by its name as exposed: ``(name, labels) -> value``."""
    samples = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        match = SAMPLE.fullmatch(line.strip())
        if match:
            labels = frozenset(LABEL.findall(match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def chat(text: str, *images: str, **extra) -> dict:
    content = [
        {"type": "text", "text": text},
        *({"type": "image_url", "image_url": {"url": u}} for u in images),
    ]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# --------------------------------------------------------------------------- metrics


def test_frontend_metrics_move(server, image_server) -> None:
    url = server.base_url + "/metrics"
    before = scrape(url)
    png = make_image(64, 48, "blue")
    http_url = image_server.add("/ops-metrics.png", png)
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        assert http.post(CHAT, json=chat("One", http_url, data_url(png))).status_code == 200
        with http.stream("POST", CHAT, json=chat("Two", stream=True)) as r:
            assert r.status_code == 200 and "data: [DONE]" in list(r.iter_lines())
        missing = http_url.rsplit("/", 1)[0] + "/ops-missing.png"  # the image server answers 404
        bad = http.post(CHAT, json=chat("Three", missing))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "image_fetch_failed"
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"route": CHAT}
    assert delta("tritonvlm_frontend_requests_total", status="200", **route) == 2
    assert delta("tritonvlm_frontend_requests_total", status="400", **route) == 1
    assert delta("tritonvlm_frontend_request_duration_seconds_count", **route) == 3
    assert delta("tritonvlm_frontend_time_to_first_token_seconds_count", **route) == 1
    assert delta("tritonvlm_frontend_images_fetched_total", source="http") == 1
    assert delta("tritonvlm_frontend_images_fetched_total", source="data") == 1
    assert delta("tritonvlm_frontend_image_bytes_total") == 2 * len(png)
    assert delta("tritonvlm_frontend_image_fetch_failures_total", reason="image_fetch_failed") == 1
    assert value(after, "tritonvlm_frontend_requests_in_flight") == 0
    assert value(after, "tritonvlm_frontend_requests_total", route="/metrics", status="200") >= 1
    assert value(after, "process_resident_memory_bytes") > 0


def test_triton_metrics_move(server) -> None:
    tokens, success = "tritonvlm_engine_tokens_total", "nv_inference_request_success"
    before = scrape(server.metrics_url)
    r = httpx.post(server.base_url + CHAT, json=chat("Count me", max_tokens=6, ignore_eos=True), timeout=120)
    assert r.status_code == 200, r.text

    def delta(samples: dict, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + 10  # the engine's series are refreshed every 250 ms
    after = scrape(server.metrics_url)
    while time.monotonic() < deadline and (
        delta(after, tokens, phase="decode") < 5 or delta(after, success, model="vlm") < 1
    ):
        time.sleep(0.1)
        after = scrape(server.metrics_url)
    assert delta(after, tokens, phase="decode") >= 5  # the first token comes from the prefill step
    assert delta(after, tokens, phase="prefill") > 0
    assert delta(after, success, model="vlm") == 1


# --------------------------------------------------------------------------- request ids


def wait_for_line(path: Path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in path.read_text(errors="replace").splitlines() if needle in line]
        if lines or time.monotonic() > deadline:
            assert lines, f"{needle!r} not in {path}"
            return lines[-1]
        time.sleep(0.1)


def test_one_request_id_in_both_logs(server) -> None:
    triton_log = server.state_dir / "tritonserver.log"
    client_id = f"ops-{uuid.uuid4().hex[:12]}"
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        mine = http.post(CHAT, json=chat("Trace me"), headers={"x-request-id": client_id})
        fresh = http.post(CHAT, json=chat("No id"))
        refused = http.post(CHAT, json=chat("Bad id"), headers={"x-request-id": "has spaces; and=more"})
    # A valid client id is used (after the route's prefix), in the body and the header alike.
    assert mine.status_code == 200 and mine.json()["id"] == f"chatcmpl-{client_id}"
    assert mine.headers["x-request-id"] == f"chatcmpl-{client_id}"
    assert refused.json()["id"] != "chatcmpl-has spaces; and=more"
    for response in (mine, fresh, refused):
        request_id = response.json()["id"]
        assert response.headers["x-request-id"] == request_id
        frontend = wait_for_line(server.log_path, f"id={request_id}")
        assert "POST /v1/chat/completions 200" in frontend
        assert "done in" in wait_for_line(triton_log, f"request {request_id} done")


# --------------------------------------------------------------------------- /health and --triton-url


def test_health_follows_an_external_triton(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A frontend with --triton-url: 200 while that Triton is ready, 503 once it is stopped, 200 again
    (and serving) once a new Triton listens on the same gRPC port. Then SIGTERM to the frontend during a
    stream longer than its --shutdown-timeout: the stream is cut and its engine sequence cancelled."""
    (grpc_port,) = free_ports(1)
    env = {"TRITONVLM_MODEL_PATH": str(tiny_model_dir), "TRITONVLM_MAX_NUM_SEQS": "4"}

    def triton(name: str) -> TritonServer:
        return TritonServer(DEFAULT_MODEL_REPOSITORY, grpc_port=grpc_port, state_dir=tmp_path / name, env=env)

    first = triton("triton-1").start()
    (tmp_path / "frontend").mkdir()
    frontend = ServerProcess(
        tiny_model_dir,
        tmp_path / "frontend",
        ("--triton-url", f"127.0.0.1:{grpc_port}", "--shutdown-timeout", "1"),
    )
    second: TritonServer | None = None
    try:
        first.wait_ready()
        frontend.wait_healthy(timeout=60)

        def health() -> int:
            return httpx.get(frontend.base_url + "/health", timeout=10).status_code

        def answer() -> httpx.Response:
            return httpx.post(frontend.base_url + CHAT, json=chat("Hello"), timeout=120)

        assert answer().status_code == 200
        first.stop()
        assert health() == 503
        down = answer()
        assert down.status_code == 503 and down.json()["error"]["code"] == "service_unavailable"

        second = triton("triton-2").start().wait_ready()
        ready_at = time.monotonic()
        while health() != 200:
            assert time.monotonic() - ready_at < 10, "/health still 503 10 s after Triton came back"
            time.sleep(0.1)
        assert answer().status_code == 200

        cancelled = {"name": "tritonvlm_engine_requests_total", "outcome": "cancelled"}
        before = value(scrape(second.metrics_url), **cancelled)
        long = chat("A long one", max_tokens=4000, ignore_eos=True, stream=True)
        # Closed mid-stream once the shutdown timeout is over.
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", frontend.base_url + CHAT, json=long, timeout=60) as r,
        ):
            for i, _ in enumerate(r.iter_lines()):
                if i == 10:
                    frontend.proc.send_signal(signal.SIGTERM)
        assert frontend.proc.wait(30) == 0, frontend.log_tail()
        deadline = time.monotonic() + 10
        while value(scrape(second.metrics_url), **cancelled) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert value(scrape(second.metrics_url), **cancelled) == before + 1
    finally:
        frontend.stop()
        first.stop()
        if second is not None:
            second.stop()
    assert frontend.leftovers() == []


# --------------------------------------------------------------------------- Ctrl-C


SHUTDOWN_TIMEOUT = 4.0


async def read_stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event) -> dict:
    """Read one stream to its end; a connection closed mid-stream is recorded, not raised."""
    body = chat("Tell me a long story.", max_tokens=max_tokens, ignore_eos=True, temperature=0, stream=True)
    result: dict = {"chunks": 0, "done": False, "finish": None, "closed": None}
    try:
        async with client.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    result["chunks"] += 1
                    result["finish"] = event["choices"][0]["finish_reason"] or result["finish"]
                    if result["chunks"] >= 3:
                        started.set()
    except httpx.RemoteProtocolError as exc:  # the server closed the connection mid-stream
        result["closed"] = str(exc)
    return result


def test_ctrl_c_during_streams_shuts_down_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGINT with 4 streams running: short ones finish within --shutdown-timeout, long ones are closed
    when it runs out, the process exits 0 and leaves no tritonserver, stub or /dev/shm file behind."""
    proc = ServerProcess(tiny_model_dir, tmp_path, ("--shutdown-timeout", str(SHUTDOWN_TIMEOUT)))
    try:
        proc.wait_healthy()

        async def scenario() -> tuple[list[dict], list[int], float]:
            async with httpx.AsyncClient(base_url=proc.base_url, timeout=60) as client:
                events = [asyncio.Event() for _ in range(4)]
                lengths = [200, 200, 4000, 4000]  # 4000 tokens take longer than the shutdown timeout
                tasks = [
                    asyncio.create_task(read_stream(client, n, e))
                    for n, e in zip(lengths, events, strict=True)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
                running = [i for i, t in enumerate(tasks) if not t.done()]
                metrics = (await client.get("/metrics")).text
                in_flight = re.search(r"^tritonvlm_frontend_requests_in_flight (\S+)$", metrics, re.M)
                # The two long streams at least are being served (the short ones may be ending).
                assert in_flight and 2 <= float(in_flight.group(1)) <= 4, metrics
                proc.proc.send_signal(signal.SIGINT)
                sent = time.monotonic()
                results = await asyncio.wait_for(asyncio.gather(*tasks), SHUTDOWN_TIMEOUT + 30)
                return results, running, sent

        results, running, sent = asyncio.run(scenario())
        code = proc.proc.wait(timeout=SHUTDOWN_TIMEOUT + 30)
        took = time.monotonic() - sent
    finally:
        proc.stop()
    log = proc.log_tail(200)
    assert code == 0, log
    assert took < SHUTDOWN_TIMEOUT + 30, took
    assert running, "every stream was over before the signal"
    for i, result in enumerate(results):
        complete = result["done"] and result["finish"] == "length" and result["closed"] is None
        closed = not result["done"] and result["closed"] is not None
        assert complete or closed, (i, result)
    # The short streams finish during the graceful shutdown.
    assert all(r["done"] for r in results[:2]), results
    assert "stopping tritonserver" in log and "Traceback" not in log, log
    assert proc.leftovers() == [], proc.leftovers()  # processes of its state dir, its /dev/shm files
