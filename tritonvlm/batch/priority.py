"""Batch jobs below interactive requests: admission control on the batch side.

:class:`InteractiveTracker` is an ASGI middleware that counts the completion requests the server is
serving (``/v1/chat/completions``, ``/v1/completions``, streams until their last byte).
:class:`BatchAdmission` is the batch worker's concurrency limit: its full value while no interactive
request is in flight, ``busy`` (default 1, so a batch still moves) while any is and for ``hold_s``
after the last one ends (closed-loop clients leave short gaps between requests). With preemption
(:func:`tritonvlm.batch.scheduler.run_jobs`), the batch requests above the lowered limit are cancelled
and requeued, freeing their engine slots at once: the engine itself knows nothing of priorities.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.types import ASGIApp, Receive, Scope, Send

INTERACTIVE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class InteractiveTracker:
    """Interactive completion requests in flight, and when the last one ended."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_seen = float("-inf")  # time.monotonic() when one last started or ended
        self._event: asyncio.Event | None = None

    def _changed(self) -> None:
        self.last_seen = time.monotonic()
        if self._event is not None:
            self._event.set()
            self._event = None

    def enter(self) -> None:
        self.in_flight += 1
        self._changed()

    def leave(self) -> None:
        self.in_flight -= 1
        self._changed()

    async def wait_change(self, timeout_s: float | None = None) -> None:
        """Wait until a request starts or ends (or ``timeout_s``)."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)


class InteractiveCounterMiddleware:
    """Counts the interactive completion requests into a tracker: ``app.add_middleware(..., tracker=t)``."""

    def __init__(self, app: ASGIApp, tracker: InteractiveTracker) -> None:
        self.app = app
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in INTERACTIVE_PATHS:
            await self.app(scope, receive, send)
            return
        self.tracker.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.tracker.leave()


class BatchAdmission:
    """The batch limit: ``full`` when no interactive request was in flight for ``hold_s``, else ``busy``."""

    def __init__(self, tracker: InteractiveTracker, full: int, busy: int = 1, hold_s: float = 1.0) -> None:
        self.tracker = tracker
        self.full = max(1, full)
        self.busy = max(0, min(busy, self.full))
        self.hold_s = hold_s

    def _quiet_in(self) -> float:
        """Seconds until the batch may run at full concurrency again (0: now)."""
        if self.tracker.in_flight > 0:
            return float("inf")
        return max(0.0, self.tracker.last_seen + self.hold_s - time.monotonic())

    def current(self) -> int:
        return self.full if self._quiet_in() == 0 else self.busy

    async def changed(self) -> None:
        quiet_in = self._quiet_in()
        await self.tracker.wait_change(None if quiet_in in (0.0, float("inf")) else quiet_in + 0.01)
