"""Unit tests of the batch file formats, the scheduler and the resumable run-batch loop (with a fake
in-process API; the real one runs in test_batch_e2e.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tritonvlm.batch.inprocess import APIResponse, BackendUnavailable
from tritonvlm.batch.lines import (
    OutputFileError,
    encode_record,
    error_record,
    parse_line,
    response_record,
    scan_output,
    survey_input,
)
from tritonvlm.batch.progress import BatchStats, ProgressBar, format_duration
from tritonvlm.batch.run_batch import BatchFileError, prepare, run_batch_file
from tritonvlm.batch.scheduler import FixedLimit, run_jobs


def line(custom_id: str = "a", url: str = "/v1/chat/completions", **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or {"model": "m"}})


# --------------------------------------------------------------------------- input lines


def test_parse_good_line():
    item = parse_line(line("x1", temperature=0), 3)
    assert (item.line, item.custom_id, item.url, item.body, item.error) == (
        3,
        "x1",
        "/v1/chat/completions",
        {"temperature": 0},
        None,
    )
    assert item.key == "x1"


@pytest.mark.parametrize(
    ("text", "code", "param", "custom_id"),
    [
        ("{not json", "invalid_json_line", None, None),
        ("[1, 2]", "invalid_json_line", None, None),
        (
            json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
            "missing_required_parameter",
            "custom_id",
            None,
        ),
        (json.dumps({"custom_id": "", "method": "POST"}), "missing_required_parameter", "custom_id", None),
        (
            json.dumps({"custom_id": "c", "url": "/v1/completions", "body": {}}),
            "missing_required_parameter",
            "method",
            "c",
        ),
        (
            json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}),
            "invalid_value",
            "method",
            "c",
        ),
        (line("c", url="/v1/embeddings"), "invalid_url", "url", "c"),
        (
            json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": []}),
            "invalid_value",
            "body",
            "c",
        ),
        (
            json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}, "x": 1}),
            "invalid_request",
            "x",
            "c",
        ),
    ],
)
def test_parse_bad_lines(text: str, code: str, param: str | None, custom_id: str | None):
    item = parse_line(text, 7)
    assert item.error is not None
    assert (item.error.code, item.error.param, item.error.line, item.custom_id) == (code, param, 7, custom_id)
    assert item.error.message.startswith("Line 7: ")
    assert item.key == (custom_id or "line:7")


def test_endpoint_must_match():
    assert parse_line(line(url="/v1/completions"), 1, endpoint="/v1/chat/completions").error.code == (
        "mismatched_endpoint"
    )


def test_survey_counts_and_finds_duplicates(tmp_path: Path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([line("a"), "", "   ", line("b"), "{bad", line("a")]) + "\n")
    survey = survey_input(path)
    assert survey.requests == 4
    assert survey.duplicates == [("a", 6)]
    assert survey.keys == {"a", "b", "line:5"}


# --------------------------------------------------------------------------- output records


def test_records_have_the_openai_shape():
    ok = response_record("a", 200, "chatcmpl-1", {"id": "chatcmpl-1"})
    assert set(ok) == {"id", "custom_id", "response", "error"} and ok["id"].startswith("batch_req_")
    assert ok["response"] == {"status_code": 200, "request_id": "chatcmpl-1", "body": {"id": "chatcmpl-1"}}
    bad = error_record(None, parse_line("{", 4).error)
    assert (
        bad["response"] is None and bad["error"]["line"] == 4 and bad["error"]["code"] == "invalid_json_line"
    )
    assert encode_record(ok).endswith(b"\n") and encode_record(ok).count(b"\n") == 1


def test_scan_output_drops_a_torn_last_line(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    good = encode_record(response_record("a", 200, "r", {})) + encode_record(
        error_record(None, parse_line("{", 9).error)
    )
    path.write_bytes(good + b'{"id":"batch_req_x","custom_id":"b","resp')
    state = scan_output(path)
    assert state.done == {"a", "line:9"} and (state.ok, state.failed) == (1, 1)
    assert state.dropped_bytes > 0
    assert path.read_bytes() == good  # repaired
    # a complete record without its newline is not done either (the newline commits it)
    path.write_bytes(good + encode_record(response_record("b", 200, "r", {}))[:-1])
    assert scan_output(path).done == {"a", "line:9"}
    assert path.read_bytes() == good


def test_scan_output_refuses_damage_and_repeats(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"garbage\n" + encode_record(response_record("a", 200, "r", {})))
    with pytest.raises(OutputFileError, match="line 1"):
        scan_output(path)
    path.write_bytes(encode_record(response_record("a", 200, "r", {})) * 2)
    with pytest.raises(OutputFileError, match="repeats"):
        scan_output(path)


# --------------------------------------------------------------------------- scheduler


class TestScheduler:
    def test_bounded_and_complete(self):
        running, peak, seen = 0, 0, []

        async def work(job: int) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001 * (job % 3))
            running -= 1
            return job * 2

        stats = asyncio.run(run_jobs(iter(range(50)), work, lambda j, r: seen.append((j, r)), FixedLimit(4)))
        assert peak == 4 and stats.max_in_flight == 4
        assert sorted(seen) == [(i, 2 * i) for i in range(50)]

    def test_an_error_stops_everything(self):
        started = []

        async def work(job: int) -> int:
            started.append(job)
            if job == 3:
                raise RuntimeError("boom")
            await asyncio.sleep(10)
            return job

        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(
                asyncio.wait_for(run_jobs(iter(range(100)), work, lambda j, r: None, FixedLimit(5)), 5)
            )
        assert len(started) < 100

    def test_preemption_requeues_the_youngest(self):
        class Dropping:
            def __init__(self) -> None:
                self.value = 4
                self.event = asyncio.Event()

            def current(self) -> int:
                return self.value

            async def changed(self) -> None:
                await self.event.wait()
                self.event = asyncio.Event()

        limit = Dropping()
        cancelled: list[int] = []
        results: list[int] = []

        async def work(job: int) -> int:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                cancelled.append(job)
                raise
            return job

        async def main() -> None:
            async def drop() -> None:
                await asyncio.sleep(0.01)
                limit.value = 1
                limit.event.set()
                await asyncio.sleep(0.2)
                limit.value = 4
                limit.event.set()

            dropper = asyncio.create_task(drop())
            stats = await run_jobs(iter(range(12)), work, lambda j, r: results.append(r), limit, preempt=True)
            await dropper
            assert stats.preempted == 3

        asyncio.run(main())
        assert sorted(cancelled) == [1, 2, 3]  # the three youngest of 0..3; 0 (the oldest) went on
        assert sorted(results) == list(range(12))  # each once


# --------------------------------------------------------------------------- run-batch


class FakeAPI:
    """Answers like the frontend would: echoes the prompt; model "bad" → 404; ``unavailable`` times 503."""

    def __init__(self, unavailable: int = 0, ready: bool = True) -> None:
        self.sent: list[str] = []
        self.unavailable = unavailable
        self.ready = ready

    async def post(self, url: str, body: dict[str, Any], request_id: str | None = None) -> APIResponse:
        if self.unavailable:
            self.unavailable -= 1
            return APIResponse(503, {"error": {"code": "service_unavailable"}}, "")
        self.sent.append(body["prompt"])
        await asyncio.sleep(0.001)
        if body.get("model") == "bad":
            return APIResponse(404, {"error": {"message": "no model", "code": "model_not_found"}}, "cmpl-x")
        usage = {"prompt_tokens": 3, "completion_tokens": 2}
        return APIResponse(
            200, {"id": "cmpl-1", "choices": [{"text": body["prompt"]}], "usage": usage}, "cmpl-1"
        )

    async def is_ready(self) -> bool:
        return self.ready


def write_input(path: Path, n: int) -> None:
    lines = [
        line(f"r{i}", url="/v1/completions", model="bad" if i == 3 else "m", prompt=f"p{i}") for i in range(n)
    ]
    if n > 5:
        lines[5] = "{oops"
    path.write_text("\n".join(lines) + "\n")


def test_run_batch_file_and_resume(tmp_path: Path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 30)
    api = FakeAPI()

    async def run(limit_results: int | None = None) -> BatchStats:
        stats, done = prepare(inp, out)
        task = asyncio.create_task(
            run_batch_file(api, inp, out, concurrency=3, progress=False, stats=stats, done_keys=done)
        )  # type: ignore[arg-type]
        if limit_results is not None:
            while not out.exists() or out.read_bytes().count(b"\n") < limit_results:
                assert not task.done(), task.exception()
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return stats
        return await task

    first = asyncio.run(run(limit_results=10))
    assert first.ok + first.failed >= 10
    done_before = out.read_bytes().count(b"\n")
    stats = asyncio.run(run())
    assert stats.resumed == done_before and stats.done == 30
    records = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [r["custom_id"] or f"line:{r['error']['line']}" for r in records]
    assert sorted(keys) == sorted([f"r{i}" for i in range(30) if i != 5] + ["line:6"])
    # only the requests in flight at the interruption (3 at most) were sent twice
    assert len(api.sent) <= 29 + 3
    by_key = dict(zip(keys, records, strict=True))
    assert by_key["r3"]["response"]["status_code"] == 404
    assert by_key["line:6"]["error"]["code"] == "invalid_json_line"
    assert stats.prompt_tokens > 0


def test_prepare_refuses_bad_files(tmp_path: Path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(line("a") + "\n" + line("a") + "\n")
    with pytest.raises(BatchFileError, match="repeated custom_id"):
        prepare(inp, out)
    inp.write_text(line("a") + "\n")
    out.write_bytes(encode_record(response_record("zzz", 200, "r", {})))
    with pytest.raises(BatchFileError, match="another input"):
        prepare(inp, out)
    with pytest.raises(BatchFileError, match="does not exist"):
        prepare(tmp_path / "missing.jsonl", out)


def test_unavailable_backend_is_waited_for_then_gives_up(tmp_path: Path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 4)
    api = FakeAPI(unavailable=2)
    stats = asyncio.run(run_batch_file(api, inp, out, concurrency=1, progress=False))  # type: ignore[arg-type]
    assert stats.ok + stats.failed == 4 and out.read_text().count("\n") == 4  # no 503 was recorded
    out.unlink()
    down = FakeAPI(unavailable=10**6, ready=False)
    with pytest.raises(BackendUnavailable):
        asyncio.run(run_batch_file(down, inp, out, concurrency=2, progress=False, unavailable_timeout_s=0.3))  # type: ignore[arg-type]
    assert out.read_text() == ""  # nothing recorded: a rerun does them all


def test_progress_line():
    stats = BatchStats(total=10, resumed=2)
    stats.add(True, 5, 20)
    stats.add(False)
    text = ProgressBar(stats, enabled=True).line()
    assert "4/10" in text and "1 failed" in text and "req/s" in text and "tok/s" in text and "ETA" in text
    assert "2 already done before" in stats.summary()
    assert (
        format_duration(3725) == "1h02m05s"
        and format_duration(65) == "1m05s"
        and format_duration(float("nan")) == "?"
    )
