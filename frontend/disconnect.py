"""Stop work whose HTTP client has gone away.

Starlette notices a disconnect only while it streams a response; before that (fetching images,
waiting for the first token, generating a whole non-streamed answer) a handler keeps running for a
client that left. :func:`run_until_disconnect` runs such work next to a watcher of the ASGI
``receive`` channel and cancels the work as soon as ``http.disconnect`` arrives; the cancellation
reaches the Triton stream (``TritonVLMClient.stream`` cancels its gRPC call when cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports ``http.disconnect`` (the request body must be read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they are done, without swallowing a cancellation of the caller."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)  # raises nothing of the tasks', but does raise if the caller is cancelled
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it and raise :class:`ClientDisconnected` if the client disconnects first.

    If the caller itself is cancelled, ``work`` is cancelled too and the cancellation propagates.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _cancel_and_wait(work_task, watcher)
        raise
    if work_task.done():
        await _cancel_and_wait(watcher)
        return work_task.result()
    await _cancel_and_wait(work_task)
    raise ClientDisconnected()
