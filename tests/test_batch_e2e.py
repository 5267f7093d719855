"""End to end: `tritonvlm run-batch`, the Batch API and `Engine` against a real tritonserver (tiny test
model), with the official OpenAI SDK. One `serve` for the module; run-batch and the restarted frontends
use its Triton (`--triton-url`); `Engine` starts its own."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ServerProcess, free_port, make_image, serving
from PIL import Image

pytestmark = pytest.mark.e2e

MODEL = "tiny"
N_LINES = 200
COLORS = ("red", "green", "blue", "orange", "purple", "yellow")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    for i, color in enumerate(COLORS):
        (folder / f"{color}.png").write_bytes(make_image(56 + 8 * i, 64, color, "square"))
    return folder


@pytest.fixture(scope="module")
def batch_server(tiny_model_dir: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    grpc_port = free_port()
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("batch-serve"),
        extra=(
            "--triton-grpc-port",
            str(grpc_port),
            "--allowed-local-media-path",
            str(media_dir),
            "--startup-timeout",
            "900",
        ),  # fmt: skip
    )
    proc.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    proc.wait_healthy(900)  # a shared, loaded machine can take minutes to start Triton
    # run-batch is SIGKILLed with requests in flight (dropped streams): no clean-unload check
    yield from serving(proc, clean_unload=False)


def user(*parts: Any) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def make_lines(image_server, media_dir: Path) -> list[str]:
    """200 lines: text, one image (data:, http, file://), two images, /v1/completions, requests the API
    refuses, an unreachable image, an image that is not there, and lines that are not requests at all."""
    http_url = image_server.add("/batch-blue.png", make_image(80, 64, "blue"))
    missing_url = image_server.add("/batch-gone.png", b"")  # then removed: a 404
    image_server.files.pop("/batch-gone.png")
    dead_port = free_port()  # nothing listens there
    special: dict[int, Any] = {
        7: {"model": "not-this-one", "messages": user("hi")},
        19: {"model": MODEL, "messages": user("hi"), "temperature": 7},
        31: {"model": MODEL, "messages": user("hi"), "response_format": {"type": "xml"}},
        43: {"model": MODEL, "messages": user("hi"), "no_such_field": 1},
        55: {"model": MODEL, "messages": []},
        67: {
            "model": MODEL,
            "messages": user("What is it?", image_part(f"http://127.0.0.1:{dead_port}/x.png")),
        },
        79: {"model": MODEL, "messages": user("What is it?", image_part(missing_url))},
        91: {"model": MODEL, "messages": user("Look.", image_part("data:image/png;base64,bm90IGFuIGltYWdl"))},
        103: {"model": MODEL, "messages": user("hi"), "stream": True},
    }
    lines = []
    for i in range(N_LINES):
        cid = f"req-{i:03d}"
        color = COLORS[i % len(COLORS)]
        if i == 13:
            lines.append('{"custom_id": "broken", "method": "POST", "url": ')  # not JSON: no custom_id
            continue
        if i == 27:
            body = {"model": MODEL, "input": "x"}
            lines.append(
                json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body})
            )
            continue
        url = "/v1/chat/completions"
        if i in special:
            body = special[i]
        elif i % 10 == 5:
            url = "/v1/completions"
            body = {"model": MODEL, "prompt": f"Once upon a time {i}", "max_tokens": 6}
        elif i % 5 == 1:
            body = {
                "model": MODEL,
                "messages": user(
                    f"Question {i}: what colour?", image_part(data_url(make_image(64, 64, color)))
                ),
            }
        elif i % 5 == 2:
            first = image_part(f"file://{media_dir / f'{color}.png'}")
            second = image_part(http_url if i % 2 else data_url(make_image(72, 56, "green", "square")))
            body = {"model": MODEL, "messages": user(f"Compare {i}:", first, "and", second)}
        elif i % 5 == 3:
            body = {"model": MODEL, "messages": user(f"Describe {i}.", image_part(http_url))}
        else:
            body = {
                "model": MODEL,
                "messages": [{"role": "system", "content": "Be brief."}, *user(f"Count to {i}.")],
            }
        body.setdefault("max_tokens", 8)
        body.setdefault("temperature", 0)
        lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}))
    return lines


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory: pytest.TempPathFactory, image_server, media_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("batch-in") / "requests.jsonl"
    path.write_text("\n".join(make_lines(image_server, media_dir)) + "\n")
    return path


def run_batch_cmd(server, input_path: Path, output_path: Path, media_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tritonvlm.cli", "run-batch",
        "-i", str(input_path), "-o", str(output_path),
        "--triton-url", server.grpc_url, "--served-model-name", MODEL,
        "--allow-private-media-urls", "--allowed-local-media-path", str(media_dir),
        "--no-progress", *extra,
    ]  # fmt: skip


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def key(record: dict[str, Any]) -> str:
    return record["custom_id"] or f"line:{record['error']['line']}"


def expected_keys() -> set[str]:
    return {f"req-{i:03d}" for i in range(N_LINES) if i != 13} | {"line:14"}


@pytest.fixture(scope="module")
def run_batch_output(batch_server, batch_input: Path, media_dir: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("batch-out") / "results.jsonl"
    done = subprocess.run(
        run_batch_cmd(batch_server, batch_input, output, media_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "200/200 requests done" in done.stderr, done.stderr[-3000:]
    return output


def server_answers(server, input_path: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    """What the server's own endpoints answer for every line that is a request."""
    items = []
    for raw in input_path.read_text().splitlines():
        try:
            item = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if item["url"] in ("/v1/chat/completions", "/v1/completions") and not item["body"].get("stream"):
            items.append(item)

    def send(item: dict[str, Any]) -> tuple[str, tuple[int, dict[str, Any]]]:
        response = httpx.post(server.base_url + item["url"], json=item["body"], timeout=120)
        return item["custom_id"], (response.status_code, response.json())

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(send, items))


def same_answer(batch_body: dict[str, Any], server_body: dict[str, Any]) -> bool:
    """Equal but for the fields that differ between any two requests (id, created, and the prompt
    tokens the second one of two found in the prefix cache)."""

    def strip(body: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k not in ("id", "created")}
        if isinstance(out.get("usage"), dict):
            out["usage"] = {k: v for k, v in out["usage"].items() if k != "prompt_tokens_details"}
        return out

    return strip(batch_body) == strip(server_body)


def test_run_batch_gives_what_the_server_gives(batch_server, batch_input: Path, run_batch_output: Path):
    records = read_records(run_batch_output)
    assert len(records) == N_LINES
    by_key = {key(r): r for r in records}
    assert set(by_key) == expected_keys() and len(by_key) == N_LINES

    # lines that are not requests: an OpenAI batch error naming the line, and no response
    assert by_key["line:14"]["error"]["code"] == "invalid_json_line" and by_key["line:14"]["response"] is None
    assert by_key["req-027"]["error"]["code"] == "invalid_url" and by_key["req-027"]["error"]["line"] == 28
    stream = by_key["req-103"]["response"]
    assert stream["status_code"] == 400 and stream["body"]["error"]["param"] == "stream"

    answers = server_answers(batch_server, batch_input)
    assert len(answers) == N_LINES - 3
    statuses = Counter()
    for cid, (status, body) in answers.items():
        response = by_key[cid]["response"]
        assert by_key[cid]["error"] is None
        assert response["status_code"] == status, (cid, response, body)
        statuses[status] += 1
        if status == 200:
            assert response["request_id"] == response["body"]["id"]
            # greedy: the same tokens (text, finish reason, usage) as through /v1/chat/completions
            assert same_answer(response["body"], body), (cid, response["body"], body)
        else:
            assert response["body"] == body, (cid, response["body"], body)  # the same error body
    assert statuses[404] == 1 and statuses[400] == 7 and statuses[200] == N_LINES - 3 - 8
    errors = {cid: by_key[cid]["response"]["body"]["error"] for cid in ("req-067", "req-079", "req-091")}
    assert errors["req-067"]["message"].startswith("Could not connect")  # the unreachable image
    assert errors["req-079"]["code"] == "image_fetch_failed"  # a 404
    assert errors["req-091"]["code"] == "invalid_image"
    assert errors["req-067"]["param"] == "messages[0].content[1].image_url.url"


def test_run_batch_sigkill_and_rerun(batch_server, batch_input: Path, media_dir: Path, tmp_path: Path):
    """SIGKILL half-way (plus a torn last line), then the same command: every request once."""
    output = tmp_path / "results.jsonl"
    cmd = run_batch_cmd(batch_server, batch_input, output, media_dir, "--concurrency", "4")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not output.exists() or output.read_bytes().count(b"\n") < N_LINES // 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    before = output.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    assert N_LINES // 2 <= complete.count(b"\n") < N_LINES
    with open(output, "ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b'{"id":"batch_req_torn","custom_id":"req-199","response":{"status_c')

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{complete.count(chr(10).encode())} already done before" in rerun.stderr, rerun.stderr[-2000:]
    after = output.read_bytes()
    assert after.startswith(complete)  # results written before the kill are kept as they were
    records = read_records(output)
    keys = [key(r) for r in records]
    assert len(keys) == N_LINES and set(keys) == expected_keys()  # no duplicate, no gap
    # a third run has nothing to do
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already in" in again.stderr
    assert output.read_bytes() == after


def sdk_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def chat_only(batch_input: Path, target: Path, max_tokens: int | None = None) -> list[str]:
    """The chat requests of the batch file (a Batch API batch has one endpoint and no malformed line)."""
    lines, ids = [], []
    for raw in batch_input.read_text().splitlines():
        try:
            item = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if item["url"] == "/v1/chat/completions":
            if max_tokens is not None:
                item["body"]["max_tokens"] = max_tokens
            lines.append(json.dumps(item))
            ids.append(item["custom_id"])
    target.write_text("\n".join(lines) + "\n")
    return ids


def wait_batch(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def test_sdk_batch_api(batch_server, batch_input: Path, run_batch_output: Path, tmp_path: Path):
    client = sdk_for(batch_server)
    ids = chat_only(batch_input, tmp_path / "chat.jsonl")
    with open(tmp_path / "chat.jsonl", "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"t": "e2e"},
    )
    assert batch.status == "validating"
    done = wait_batch(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    outputs = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert done.request_counts.total == len(ids) == len(outputs) + len(errors)
    assert (done.request_counts.completed, done.request_counts.failed) == (len(outputs), len(errors))
    assert sorted(r["custom_id"] for r in outputs + errors) == sorted(ids)
    # the same answers as run-batch gave for the same lines
    offline = {key(r): r["response"] for r in read_records(run_batch_output)}
    for record in outputs + errors:
        expected = offline[record["custom_id"]]
        assert record["response"]["status_code"] == expected["status_code"]
        if expected["status_code"] == 200:
            assert same_answer(record["response"]["body"], expected["body"])
        else:
            assert record["response"]["body"] == expected["body"]
    assert batch.id in [b.id for b in client.batches.list(limit=5)]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_server_killed_mid_batch_resumes_after_restart(
    tiny_model_dir: Path, batch_server, batch_input: Path, media_dir: Path, tmp_path: Path
):
    """A frontend SIGKILLed with a batch in progress; a new one on the same --batch-state-dir finishes it,
    every request present once."""
    state = tmp_path / "batch-state"
    extra = (
        "--triton-url", batch_server.grpc_url, "--batch-state-dir", str(state),
        "--allowed-local-media-path", str(media_dir), "--batch-concurrency", "4",
    )  # fmt: skip
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = ServerProcess(tiny_model_dir, tmp_path / "first", extra=extra)
    try:
        first.wait_healthy(120)
        client = sdk_for(first)
        ids = chat_only(batch_input, tmp_path / "chat.jsonl", max_tokens=24)
        uploaded = client.files.create(file=(tmp_path / "chat.jsonl").read_bytes(), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 300
        while (counts := client.batches.retrieve(batch.id).request_counts).completed < 40:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    assert counts.completed + counts.failed < len(ids)

    second = ServerProcess(tiny_model_dir, tmp_path / "second", extra=extra)
    proc_iter = serving(second, clean_unload=False)
    server = next(proc_iter)
    try:
        client = sdk_for(server)
        done = wait_batch(client, batch.id, ("completed", "failed"))
        assert done.status == "completed", done
        records = [
            json.loads(x)
            for file_id in (done.output_file_id, done.error_file_id)
            if file_id
            for x in client.files.content(file_id).text.splitlines()
        ]
        assert sorted(r["custom_id"] for r in records) == sorted(ids)  # each once
        assert (
            done.request_counts.completed + done.request_counts.failed
            == len(ids)
            == done.request_counts.total
        )
    finally:
        with pytest.raises(StopIteration):
            next(proc_iter)


def test_engine_python_api(tiny_model_dir: Path, batch_server, media_dir: Path, tmp_path: Path):
    """`Engine` starts its own tritonserver; answers in input order, as the server answers them."""
    from tritonvlm import Engine, RequestFailed

    picture = make_image(64, 64, "purple")
    conversations = [
        user("Say something."),
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "What colour?"}, {"type": "image", "image": picture}],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": media_dir / "red.png"},
                    {"type": "image", "image": Image.open(media_dir / "green.png")},
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        user("An impossible request."),
    ]
    state = tmp_path / "engine-state"
    with Engine(
        str(tiny_model_dir), served_model_name=MODEL, state_dir=state, max_num_seqs=4, startup_timeout=900
    ) as engine:
        results = engine.chat(conversations, max_tokens=8, temperature=0)
        failed = engine.chat(conversations[:1], max_tokens=8, temperature=-1, errors="return")
        texts = engine.complete(["Once upon a time"], max_tokens=5, temperature=0)
    assert isinstance(failed[0], RequestFailed) and failed[0].error["param"] == "temperature"
    client = sdk_for(batch_server)
    converted = [
        user("Say something."),
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "What colour?"}, image_part(data_url(picture))],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    image_part(data_url((media_dir / "red.png").read_bytes())),
                    image_part(f"file://{media_dir / 'green.png'}"),
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        user("An impossible request."),
    ]
    for result, messages in zip(results, converted, strict=True):
        expected = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert result.choices[0].message.content == expected.choices[0].message.content
        assert result.usage.completion_tokens == expected.usage.completion_tokens
    expected_text = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert texts[0].choices[0].text == expected_text.choices[0].text
    # the engine's tritonserver is gone, and nothing of it is left
    ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    assert str(state) not in ps
