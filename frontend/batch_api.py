"""The OpenAI Batch API: ``/v1/files`` and ``/v1/batches``, for the SDK's ``client.files`` and
``client.batches`` calls.

Files (``purpose="batch"`` uploads, and the ``batch_output`` files of finished batches) and batches live
in a :class:`~tritonvlm.batch.store.BatchStore` under ``settings.batch_state_dir``; a
:class:`~tritonvlm.batch.worker.BatchWorker` started with the app runs them through the frontend's own
request path, one batch at a time, below interactive traffic: an ASGI middleware counts the completion
requests in flight, and the worker drops to one batch request (cancelling and requeueing the others)
while there are any (``batch_busy_concurrency``). See the README's "Batch inference" section.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from tritonvlm.batch.lines import SUPPORTED_URLS
from tritonvlm.batch.priority import BatchAdmission, InteractiveCounterMiddleware, InteractiveTracker
from tritonvlm.batch.store import ACTIVE_STATUSES, BatchRow, BatchStore, FileRow
from tritonvlm.frontend.errors import APIError

logger = logging.getLogger("tritonvlm.frontend.batch_api")

FILE_PURPOSE = "batch"
COMPLETION_WINDOW = "24h"
_MAX_METADATA = 16
_CANCELLABLE = ("validating", "in_progress")
_COPY_CHUNK = 1 << 20


class CreateBatchRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None


class BatchService:
    """The store, the worker and the interactive-request count of one app."""

    def __init__(self, app: FastAPI, state_dir: str, concurrency: int, busy_concurrency: int = 1) -> None:
        self.app = app
        self.state_dir = state_dir
        self.tracker = InteractiveTracker()
        self.admission = BatchAdmission(self.tracker, full=concurrency, busy=busy_concurrency)
        self.store: BatchStore | None = None
        self.worker: Any = None
        self._api: Any = None

    async def start(self) -> None:
        """Open the store (refused if another server holds it) and start the worker."""
        from tritonvlm.batch.inprocess import InProcessAPI
        from tritonvlm.batch.worker import BatchWorker

        self.store = await asyncio.to_thread(BatchStore, self.state_dir)
        state = self.app.state
        self._api = InProcessAPI(state.settings, state.client, state.media_fetcher)
        self.worker = BatchWorker(self.store, self._api, self.admission)
        self.worker.start()
        logger.info("Batch API: state in %s", self.state_dir)

    async def stop(self) -> None:
        """Stop the worker (its requests in flight are redone after a restart) and close the store."""
        if self.worker is not None:
            await self.worker.stop()
        if self._api is not None:
            await self._api.aclose()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    def require_store(self) -> BatchStore:
        if self.store is None:
            raise APIError(503, "The Batch API is not running.", code="service_unavailable")
        return self.store


def _not_found(kind: str, object_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {kind} object: {object_id}", param=param, code="not_found")


def _file_list(rows: list[FileRow], has_more: bool) -> dict[str, Any]:
    data = [r.to_api() for r in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > _MAX_METADATA:
        raise APIError(
            400, f"'metadata' has more than {_MAX_METADATA} keys.", param="metadata", code="invalid_value"
        )
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise APIError(
                400,
                "'metadata' keys are at most 64 characters and values at most 512.",
                param="metadata",
                code="invalid_value",
            )


def build_router(service: BatchService, served_model_name: str) -> APIRouter:
    """The ``/v1/files`` and ``/v1/batches`` routes."""
    router = APIRouter()

    async def db(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ------------------------------------------------------------------ files
    @router.post("/v1/files")
    async def upload_file(request: Request) -> JSONResponse:
        """Upload a batch input file (multipart: ``file``, ``purpose="batch"``)."""
        store = service.require_store()
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # noqa: BLE001 - malformed multipart bodies of every kind
            message = f"The request must be multipart/form-data with 'file' and 'purpose' ({exc})."
            raise APIError(400, message) from None
        try:
            unknown = sorted(set(form.keys()) - {"file", "purpose"})
            if unknown:
                raise APIError(
                    400,
                    f"'{unknown[0]}' is not supported by this server.",
                    param=unknown[0],
                    code="unsupported_parameter",
                )
            purpose, upload = form.get("purpose"), form.get("file")
            if not isinstance(purpose, str) or not purpose:
                raise APIError(400, "Missing required parameter: 'purpose'.", param="purpose")
            if purpose != FILE_PURPOSE:
                raise APIError(
                    400,
                    f"Only purpose 'batch' is supported by this server, not {purpose!r}.",
                    param="purpose",
                    code="invalid_value",
                )
            if upload is None or isinstance(upload, str):
                raise APIError(400, "Missing required parameter: 'file' (a file part).", param="file")
            temp = store.temp_path()

            def save() -> FileRow:
                upload.file.seek(0)
                with open(temp, "wb") as out:
                    shutil.copyfileobj(upload.file, out, _COPY_CHUNK)
                return store.add_file(temp, upload.filename or "upload.jsonl", purpose)

            row = await db(save)
        finally:
            await form.close()
        return JSONResponse(row.to_api())

    @router.get("/v1/files")
    async def list_files(
        purpose: str | None = None,
        limit: int = Query(10000, ge=1, le=10000),
        after: str | None = None,
        order: str = Query("desc", pattern="^(asc|desc)$"),
    ) -> JSONResponse:
        """The files, newest first by default."""
        rows, more = await db(service.require_store().list_files, purpose, limit, after, order)
        return JSONResponse(_file_list(rows, more))

    async def get_file(file_id: str) -> FileRow:
        row = await db(service.require_store().get_file, file_id)
        if row is None:
            raise _not_found("File", file_id, "file_id")
        return row

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> JSONResponse:
        """A file's object."""
        return JSONResponse((await get_file(file_id)).to_api())

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> FileResponse:
        """A file's bytes."""
        row = await get_file(file_id)
        return FileResponse(service.require_store().file_path(row.id), media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> JSONResponse:
        """Delete a file (refused while an unfinished batch reads it)."""
        store = service.require_store()
        await get_file(file_id)
        active, _ = await db(store.list_batches, 100000)
        if any(b.input_file_id == file_id and b.status in ACTIVE_STATUSES for b in active):
            raise APIError(
                409,
                f"File {file_id} is the input of an unfinished batch.",
                param="file_id",
                code="file_in_use",
            )
        await db(store.delete_file, file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # ------------------------------------------------------------------ batches
    async def get_batch(batch_id: str) -> BatchRow:
        row = await db(service.require_store().get_batch, batch_id)
        if row is None:
            raise _not_found("Batch", batch_id, "batch_id")
        return row

    @router.post("/v1/batches")
    async def create_batch(body: CreateBatchRequest) -> JSONResponse:
        """Accept a batch; the worker validates and runs it."""
        store = service.require_store()
        if body.output_expires_after is not None:
            raise APIError(
                400,
                "'output_expires_after' is not supported by this server.",
                param="output_expires_after",
                code="unsupported_parameter",
            )
        if body.endpoint not in SUPPORTED_URLS:
            allowed = ", ".join(SUPPORTED_URLS)
            raise APIError(
                400, f"'endpoint' must be one of {allowed}.", param="endpoint", code="invalid_value"
            )
        if body.completion_window != COMPLETION_WINDOW:
            raise APIError(
                400, "'completion_window' must be '24h'.", param="completion_window", code="invalid_value"
            )
        _check_metadata(body.metadata)
        file = await db(store.get_file, body.input_file_id)
        if file is None:
            raise _not_found("File", body.input_file_id, "input_file_id")
        if file.purpose != FILE_PURPOSE:
            raise APIError(
                400,
                f"File {file.id} has purpose {file.purpose!r}; a batch input needs purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        row = await db(
            store.create_batch,
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
            served_model_name,
        )
        service.worker.wake()
        return JSONResponse(row.to_api())

    @router.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> JSONResponse:
        """The batches, newest first."""
        rows, more = await db(service.require_store().list_batches, limit, after)
        data = [r.to_api() for r in rows]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": more,
            }
        )

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> JSONResponse:
        """A batch's object (status, request counts, file ids...)."""
        return JSONResponse((await get_batch(batch_id)).to_api())

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> JSONResponse:
        """Cancel a batch that is validating or in progress: ``cancelling``, then ``cancelled`` with the
        results done so far in its files."""
        row = await get_batch(batch_id)
        if row.status == "cancelling":
            return JSONResponse(row.to_api())
        if row.status not in _CANCELLABLE:
            raise APIError(
                409,
                f"Cannot cancel a batch with status '{row.status}'.",
                param="batch_id",
                code="invalid_state",
            )
        changed = await db(service.require_store().set_status, batch_id, "cancelling", only_from=_CANCELLABLE)
        service.worker.cancel(batch_id)
        return JSONResponse((changed or await get_batch(batch_id)).to_api())

    return router


def install_batch_api(app: FastAPI, settings: Any) -> BatchService:
    """Mount the Batch API on ``app`` and count its interactive requests; the returned service is started
    and stopped by the app's lifespan."""
    service = BatchService(
        app, str(settings.batch_state_dir), settings.batch_concurrency, settings.batch_busy_concurrency
    )
    app.include_router(build_router(service, settings.served_model_name))
    app.add_middleware(InteractiveCounterMiddleware, tracker=service.tracker)
    app.state.batch_service = service
    return service
