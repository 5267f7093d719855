"""Unit tests of the Batch API (``/v1/files``, ``/v1/batches``) and its worker: the real app, store and
worker, the official OpenAI SDK over Starlette's TestClient, and a fake Triton client (the end-to-end
tests in test_batch_e2e.py use the real one)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from tritonvlm.batch.store import BatchStore, StoreBusyError
from tritonvlm.frontend.app import FrontendSettings, create_app
from tritonvlm.frontend.triton_client import StreamDelta, TritonRequestError

MODEL = "test-vlm"


class EchoClient:
    """Answers with the last user text upper-cased; "FAIL" in it gives a Triton error; each request takes
    ``delay`` seconds. Counts the requests in flight."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0

    async def is_ready(self) -> bool:
        return True

    async def stream(
        self, messages: Any, images: Any, parameters: dict[str, Any], request_id: str, **prompt: Any
    ) -> AsyncIterator[StreamDelta]:
        text = prompt.get("prompt") or messages[-1]["content"]
        if isinstance(text, list):
            text = " ".join(p.get("text", "") for p in text)
        self.calls.append(text)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if "FAIL" in text:
                raise TritonRequestError(True, "the model refused this prompt", "messages")
            yield StreamDelta(text.upper(), [1, 2], "stop", 7, 2)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


def chat_line(custom_id: str, text: str, **body: Any) -> str:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": text}], **body}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": payload}
    )


def make_app(tmp_path: Path, backend: EchoClient, **settings: Any):
    return create_app(
        FrontendSettings(served_model_name=MODEL, batch_state_dir=str(tmp_path / "batches"), **settings),
        client=backend,
    )


@pytest.fixture
def sdk(tmp_path: Path):
    backend = EchoClient()
    with TestClient(make_app(tmp_path, backend)) as http:
        yield (
            openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0),
            backend,
        )


def wait_for(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def records(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_sdk_flow_completes_with_output_and_error_files(sdk):
    client, backend = sdk
    lines = [chat_line(f"r{i}", f"hello {i}") for i in range(6)]
    lines.insert(2, chat_line("bad-model", "x", model="other"))
    lines.insert(4, chat_line("refused", "FAIL please"))
    lines.insert(5, chat_line("bad-param", "x", temperature=9))
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0 and uploaded.filename == "in.jsonl"
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "unit"},
    )
    assert batch.status == "validating" and batch.metadata == {"job": "unit"} and batch.model == MODEL
    done = wait_for(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert done.request_counts.total == 9
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 3)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.usage.input_tokens == 6 * 7 and done.usage.output_tokens == 6 * 2
    ok = records(client, done.output_file_id)
    assert [r["custom_id"] for r in ok] == [f"r{i}" for i in range(6)]  # input order
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in ok)
    assert ok[3]["response"]["body"]["choices"][0]["message"]["content"] == "HELLO 3"
    assert ok[0]["response"]["request_id"] == ok[0]["response"]["body"]["id"] == f"chatcmpl-{batch.id}-1"
    failed = {r["custom_id"]: r["response"] for r in records(client, done.error_file_id)}
    assert failed["bad-model"]["status_code"] == 404
    assert failed["bad-model"]["body"]["error"]["code"] == "model_not_found"
    assert failed["refused"]["status_code"] == 400
    assert failed["refused"]["body"]["error"]["message"] == "the model refused this prompt"
    assert failed["bad-param"]["body"]["error"]["param"] == "temperature"
    # the output files are files like any other
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output"
    assert {f.id for f in client.files.list()} >= {uploaded.id, done.output_file_id, done.error_file_id}
    assert [b.id for b in client.batches.list()] == [batch.id]


def test_bad_lines_fail_validation_like_openai(sdk):
    client, _ = sdk
    lines = [
        chat_line("a", "hi"),
        "{not json",
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {}}),
        chat_line("a", "again"),
    ]
    uploaded = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_for(client, batch.id, ("failed", "completed"))
    assert failed.status == "failed" and failed.failed_at
    codes = [(e.code, e.line) for e in failed.errors.data]
    assert codes == [("invalid_json_line", 2), ("mismatched_endpoint", 3), ("duplicate_custom_id", 4)]
    assert failed.output_file_id is None


def test_create_errors(sdk):
    client, _ = sdk
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    uploaded = client.files.create(file=("in.jsonl", chat_line("a", "b").encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")


def test_cancel_keeps_finished_results(tmp_path: Path):
    backend = EchoClient(delay=0.2)
    with TestClient(make_app(tmp_path, backend, batch_concurrency=2)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        lines = "\n".join(chat_line(f"r{i}", f"x{i}") for i in range(40))
        uploaded = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 10
        while client.batches.retrieve(batch.id).request_counts.completed < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        cancelled = wait_for(client, batch.id, ("cancelled",))
        assert cancelled.cancelling_at and cancelled.cancelled_at
        ok = records(client, cancelled.output_file_id)
        assert 3 <= len(ok) == cancelled.request_counts.completed < 40
        assert len({r["custom_id"] for r in ok}) == len(ok)
        assert backend.max_in_flight <= 2
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch.id)


def test_batch_yields_to_interactive_requests(tmp_path: Path):
    """While an interactive request is in flight the batch runs one request at a time; the others are
    cancelled (preempted) and run again later; nothing is lost or repeated."""
    backend = EchoClient(delay=0.3)
    with TestClient(make_app(tmp_path, backend, batch_concurrency=4)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        lines = "\n".join(chat_line(f"r{i}", f"x{i}") for i in range(24))
        uploaded = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 10
        while backend.in_flight < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        backend.delay = 1.0  # a long interactive request
        response = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "now"}]}
        )
        backend.delay = 0.05
        assert response.status_code == 200
        assert backend.cancelled >= 3  # the batch's requests above one were preempted
        done = wait_for(client, batch.id, ("completed",))
        ok = records(client, done.output_file_id)
        assert sorted(r["custom_id"] for r in ok) == sorted(f"r{i}" for i in range(24))


def test_restart_resumes_an_accepted_batch(tmp_path: Path):
    backend = EchoClient(delay=0.05)
    with TestClient(make_app(tmp_path, backend, batch_concurrency=2)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        lines = "\n".join(chat_line(f"r{i}", f"x{i}") for i in range(30))
        uploaded = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 10
        while client.batches.retrieve(batch.id).request_counts.completed < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # the app stopped mid-batch (its worker cancelled); a new one on the same folder finishes it
    before = len(backend.calls)
    assert before < 30
    with TestClient(make_app(tmp_path, backend, batch_concurrency=2)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        done = wait_for(client, batch.id, ("completed",))
        ok = records(client, done.output_file_id)
    assert [r["custom_id"] for r in ok] == [f"r{i}" for i in range(30)]
    assert done.request_counts.completed == 30
    # only the requests without a result were sent again (at most the two in flight were repeated)
    assert len(backend.calls) - before <= 30 - 5 + 2


def test_one_server_per_state_folder(tmp_path: Path):
    first = BatchStore(tmp_path)
    try:
        with pytest.raises(StoreBusyError):
            BatchStore(tmp_path)
    finally:
        first.close()
    BatchStore(tmp_path).close()


def test_no_batch_api_without_a_state_dir():
    app = create_app(FrontendSettings(served_model_name=MODEL), client=EchoClient())
    with TestClient(app) as http:
        assert http.get("/v1/batches").status_code == 404
