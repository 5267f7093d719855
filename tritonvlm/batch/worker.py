"""The server's batch worker: runs accepted batches, oldest first, one at a time.

For each batch it takes the next step its status calls for, so a restarted server picks up where the
last one stopped:

* ``validating``: read the input file; a malformed line (not JSON, no ``custom_id``, a ``url`` other
  than the batch's endpoint...), a repeated ``custom_id`` or an empty file fails the batch with
  ``errors`` naming the lines, as OpenAI does; otherwise ``in_progress`` with the request count;
* ``in_progress``: run the requests that have no result yet through the frontend's request path
  (:class:`~tritonvlm.batch.inprocess.InProcessAPI`) at the :class:`~tritonvlm.batch.priority.BatchAdmission`
  limit, preempting batch requests when interactive ones arrive, and record each result; then
  ``finalizing``; past ``expires_at``, the requests not run are failed with ``batch_expired``;
* ``finalizing`` / ``cancelling``: write the output and error files → ``completed`` / ``cancelled``
  (``expired``).

A cancel request (:meth:`BatchWorker.cancel`) stops the running batch's requests at once. Triton being
unavailable pauses the batch until it is back (its requests are not failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from tritonvlm.batch.inprocess import InProcessAPI, ReadyGate, execute_line
from tritonvlm.batch.lines import BatchLine, LineError, error_record, read_lines, record_ok, request_tokens
from tritonvlm.batch.priority import BatchAdmission
from tritonvlm.batch.scheduler import run_jobs
from tritonvlm.batch.store import BatchRow, BatchStore

logger = logging.getLogger("tritonvlm.batch.worker")

MAX_REPORTED_ERRORS = 100
_IDLE_POLL_S = 5.0


class _Cancelled(Exception):
    """The running batch was cancelled or expired."""


def validate_input(path: str, endpoint: str) -> tuple[int, list[dict[str, Any]]]:
    """(request count, OpenAI batch errors) of an input file."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    count = 0
    for item in read_lines(path, endpoint):
        count += 1
        if item.error is not None:
            errors.append(item.error.to_dict())
        elif item.key in seen:
            message = f"Line {item.line}: the custom_id {item.custom_id!r} is used by an earlier line."
            errors.append(LineError("duplicate_custom_id", message, "custom_id", item.line).to_dict())
        seen.add(item.key)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if count == 0 and not errors:
        errors.append(LineError("empty_file", "The input file has no requests.").to_dict())
    return count, errors


class BatchWorker:
    """Runs the store's active batches in the server's event loop (see the module docstring)."""

    def __init__(self, store: BatchStore, api: InProcessAPI, admission: BatchAdmission) -> None:
        self.store = store
        self.api = api
        self.admission = admission
        self.gate = ReadyGate(api.is_ready)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._current: str | None = None
        self._current_task: asyncio.Task[Any] | None = None
        self._stopping = False

    async def _db(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-worker")

    async def stop(self) -> None:
        """Stop at once: requests in flight are cancelled and redone after a restart."""
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """A batch was created or cancelled: look at the store now."""
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """Stop the requests of ``batch_id`` if it is the one running (its status is already cancelling)."""
        self.wake()
        if self._current == batch_id and self._current_task is not None:
            self._current_task.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                batch = await self._db(self.store.next_active)
                if batch is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), _IDLE_POLL_S)
                    continue
                await self._step(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker must go on; the batch is retried
                logger.exception("batch worker error; retrying in %.0f s", _IDLE_POLL_S)
                await asyncio.sleep(_IDLE_POLL_S)

    async def _step(self, batch: BatchRow) -> None:
        if batch.status == "validating":
            await self._validate(batch)
        elif batch.status == "in_progress":
            await self._run(batch)
        elif batch.status == "finalizing":
            await self._finalize(batch, "completed")
        elif batch.status == "cancelling":
            await self._finalize(batch, "cancelled")

    async def _validate(self, batch: BatchRow) -> None:
        path = str(self.store.file_path(batch.input_file_id))
        try:
            count, errors = await self._db(validate_input, path, batch.endpoint)
        except FileNotFoundError:
            count, errors = 0, [LineError("file_not_found", "The input file was deleted.").to_dict()]
        if errors:
            logger.info("batch %s failed validation: %s", batch.id, errors[0]["message"])
            await self._db(
                self.store.set_status, batch.id, "failed", only_from=("validating",), errors=errors
            )
        else:
            await self._db(
                self.store.set_status, batch.id, "in_progress", only_from=("validating",), total=count
            )
            logger.info("batch %s: %d requests", batch.id, count)

    async def _run(self, batch: BatchRow) -> None:
        done = await self._db(self.store.done_lines, batch.id)
        path = str(self.store.file_path(batch.input_file_id))
        expired_lines: list[BatchLine] = []

        def jobs() -> Any:
            for item in read_lines(path, batch.endpoint):
                if item.line not in done:
                    if batch.expires_at is not None and time.time() > batch.expires_at:
                        expired_lines.append(item)
                        continue
                    yield item

        async def work(item: BatchLine) -> dict[str, Any]:
            # "chatcmpl-batch_<id>-<line>": batch requests stand out in the logs, Triton's included
            return await execute_line(self.api, item, self.gate, None, f"{batch.id}-{item.line}")

        async def record(item: BatchLine, result: dict[str, Any]) -> None:
            body = (result.get("response") or {}).get("body")
            await self._db(
                self.store.add_result, batch.id, item.line, record_ok(result), result, request_tokens(body)
            )

        self._current = batch.id
        self._current_task = asyncio.ensure_future(
            run_jobs(jobs(), work, record, self.admission, preempt=True)
        )
        started = time.monotonic()
        try:
            stats = await self._current_task
        except asyncio.CancelledError:
            if self._stopping:
                raise
            logger.info("batch %s: requests stopped (cancelled)", batch.id)
            return  # its status is cancelling: the next step finalizes it
        finally:
            self._current, self._current_task = None, None
        logger.info(
            "batch %s: %d requests run in %.1f s (%d preempted)",
            batch.id,
            stats.finished,
            time.monotonic() - started,
            stats.preempted,
        )
        if expired_lines:
            await self._expire(batch, expired_lines)
            return
        await self._db(self.store.set_status, batch.id, "finalizing", only_from=("in_progress",))

    async def _expire(self, batch: BatchRow, lines: list[BatchLine]) -> None:
        extra = []
        for item in lines:
            error = LineError(
                "batch_expired",
                "This request could not be executed before the completion window expired.",
                line=item.line,
            )
            extra.append((item.line, json.dumps(error_record(item.custom_id, error), ensure_ascii=False)))
        await self._db(self.store.finalize, batch.id, "expired", extra)

    async def _finalize(self, batch: BatchRow, status: str) -> None:
        row = await self._db(self.store.finalize, batch.id, status)
        if row is not None:
            logger.info(
                "batch %s %s: %d completed, %d failed of %d",
                batch.id,
                status,
                row.completed,
                row.failed,
                row.total,
            )
