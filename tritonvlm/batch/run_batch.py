"""``tritonvlm run-batch``: an OpenAI Batch input file in, an OpenAI Batch output file out, resumably.

The input is surveyed first (request count for the progress bar; a repeated ``custom_id`` refuses the
file, as OpenAI does, since results are matched to requests by it). An existing output file is read:
its complete records are the requests already done, a partially written last line (a process killed
mid-write) is cut off, and a record for a ``custom_id`` that is not in the input refuses the run (the
output of another input). The other requests run at a bounded concurrency; each result is appended
as one line with a single ``write`` as soon as it is known (so the output is in completion order) and
synced to disk at least every second. Interrupted at any point and run again with the same files, the
run does each remaining request once: none is lost, none is repeated.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tritonvlm.batch.inprocess import InProcessAPI, ReadyGate, execute_line
from tritonvlm.batch.lines import (
    BatchLine,
    OutputFileError,
    encode_record,
    read_lines,
    record_ok,
    request_tokens,
    scan_output,
    survey_input,
)
from tritonvlm.batch.progress import BatchStats, ProgressBar
from tritonvlm.batch.scheduler import FixedLimit, run_jobs

_SYNC_EVERY_S = 1.0


class BatchFileError(Exception):
    """The input or output file cannot be used (the message says why)."""


class _Appender:
    """Appends whole lines to a file with one ``write`` each and fsyncs at most every ``sync_every_s``."""

    def __init__(self, path: Path, sync_every_s: float = _SYNC_EVERY_S) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.sync_every_s = sync_every_s
        self._synced = time.monotonic()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        if time.monotonic() - self._synced >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            os.close(self.fd)


def prepare(input_path: Path, output_path: Path) -> tuple[BatchStats, set[str]]:
    """Survey the input, read (and repair) the output: the stats to start from and the keys done."""
    if not input_path.is_file():
        raise BatchFileError(f"input file {input_path} does not exist")
    survey = survey_input(input_path)
    if survey.duplicates:
        shown = ", ".join(f"{key!r} (line {line})" for key, line in survey.duplicates[:5])
        raise BatchFileError(
            f"{input_path}: {len(survey.duplicates)} repeated custom_id(s): {shown}; "
            "every request needs its own custom_id"
        )
    try:
        state = scan_output(output_path)
    except OutputFileError as exc:
        raise BatchFileError(str(exc)) from None
    foreign = state.done - survey.keys
    if foreign:
        raise BatchFileError(
            f"{output_path} holds results for {len(foreign)} request(s) that are not in {input_path} "
            f"(e.g. {sorted(foreign)[0]!r}): it is the output of another input file"
        )
    stats = BatchStats(total=survey.requests, resumed=len(state.done))
    return stats, state.done


async def run_batch_file(
    api: InProcessAPI,
    input_path: Path,
    output_path: Path,
    *,
    concurrency: int,
    progress: bool = True,
    unavailable_timeout_s: float | None = 120.0,
    stats: BatchStats | None = None,
    done_keys: set[str] | None = None,
) -> BatchStats:
    """Run every request of ``input_path`` not yet in ``output_path`` and append its record there.

    ``stats``/``done_keys`` come from :func:`prepare` (called here when not given). Raises
    :class:`BatchFileError` for unusable files and
    :class:`~tritonvlm.batch.inprocess.BackendUnavailable` when Triton stays down longer than
    ``unavailable_timeout_s``; the results written so far stay, and a rerun resumes.
    """
    if stats is None or done_keys is None:
        stats, done_keys = prepare(input_path, output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    bar = ProgressBar(stats, enabled=progress, label="run-batch")
    gate = ReadyGate(api.is_ready)
    appender = _Appender(output_path)
    skip = done_keys

    def jobs() -> Any:
        for item in read_lines(input_path):
            if item.key not in skip:
                yield item

    async def work(item: BatchLine) -> dict[str, Any]:
        return await execute_line(api, item, gate, unavailable_timeout_s)

    def done(item: BatchLine, record: dict[str, Any]) -> None:
        appender.write(encode_record(record))
        body = (record.get("response") or {}).get("body")
        stats.add(record_ok(record), *request_tokens(body))
        bar.update()

    stats.started = time.monotonic()
    bar.update(force=True)
    try:
        await run_jobs(jobs(), work, done, FixedLimit(concurrency))
    finally:
        stats.ended = time.monotonic()
        appender.close()
        bar.close()
    return stats


async def wait_ready(api: InProcessAPI, timeout_s: float) -> None:
    """Wait until Triton is ready (``BackendUnavailable`` after ``timeout_s``)."""
    await ReadyGate(api.is_ready, interval_s=0.5).wait(since=time.monotonic(), timeout_s=timeout_s)
