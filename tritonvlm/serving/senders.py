"""Getting the engine's outputs to the clients, and noticing clients that left.

A Triton response sender must not be touched after its final response (python_backend 2.51 races an
``is_cancelled()`` poll against the release of a finished request), so every request's sender is
wrapped in a :class:`TrackedSender` whose final send and cancellation polls take the same lock.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tritonvlm.engine.sequence import EngineOutput

log = logging.getLogger("tritonvlm.vlm")


class TrackedSender:
    """One request's response sender, with the state the streamer and the cancel monitor share."""

    def __init__(self, sender: Any, engine_id: str, final_flag: int) -> None:
        self.sender = sender
        self.engine_id = engine_id
        self.final_flag = final_flag
        self.cancelled = False  # the client left and the engine was told to drop the request
        self.closed = False  # the final response went out: the sender must not be touched again
        self.lock = threading.Lock()

    def send(self, response: Any = None, final: bool = False) -> None:
        """Send a response (``None``: only the final flag); the final one under the lock."""
        if not final:
            self.sender.send(response, flags=0)
            return
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if response is None:
                self.sender.send(flags=self.final_flag)
            else:
                self.sender.send(response, flags=self.final_flag)

    def poll_cancelled(self) -> bool:
        """True the first time the client is seen gone (the caller then cancels the engine side)."""
        with self.lock:
            if self.closed or self.cancelled:
                return False
            try:
                self.cancelled = bool(self.sender.is_cancelled())
            except Exception:
                self.cancelled = True
            return self.cancelled


def merge_outputs(first: EngineOutput, second: EngineOutput) -> EngineOutput:
    """Two consecutive outputs of one sequence as one: text and tokens joined, the later state."""
    logprobs = None
    if first.logprobs is not None or second.logprobs is not None:
        logprobs = (first.logprobs or []) + (second.logprobs or [])
    return dataclasses.replace(
        second,
        text=first.text + second.text,
        token_ids=first.token_ids + second.token_ids,
        logprobs=logprobs,
    )


def coalesce(entries: list[tuple[TrackedSender, EngineOutput]]) -> list[tuple[TrackedSender, EngineOutput]]:
    """Merge each sequence's queued outputs into one, in the order the sequences first appear. An
    output with an error is never merged with what follows it."""
    merged: dict[int, list] = {}
    order: list[list] = []
    for tracked, out in entries:
        slot = merged.get(id(tracked))
        if slot is None or slot[1].error is not None or slot[1].finished:
            slot = [tracked, out]
            merged[id(tracked)] = slot
            order.append(slot)
        else:
            slot[1] = merge_outputs(slot[1], out)
    return [(tracked, out) for tracked, out in order]


class ResponseStreamer:
    """Sends outputs from a thread of its own, in the order they were produced.

    Each send is a round trip to the Triton process; made from the engine thread, a batch of 16
    sequences would wait for 16 of them after every step. Here the engine goes on with the next step
    while the previous step's tokens are sent (sends and torch both run without the GIL). When sending
    falls behind the engine (many streams, fast steps), each sequence's queued outputs go out as one
    response (:func:`coalesce`): the client gets the same text and tokens in fewer chunks.
    ``deliver(tracked, output)`` does the sending; if it raises (the client is gone),
    ``on_failure(tracked)`` is called.
    """

    def __init__(
        self,
        deliver: Callable[[TrackedSender, EngineOutput], None],
        on_failure: Callable[[TrackedSender], None],
    ) -> None:
        self._deliver = deliver
        self._on_failure = on_failure
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.outputs = 0  # engine outputs taken from the queue
        self.responses = 0  # responses sent for them
        self._thread = threading.Thread(target=self._run, name="vlm-sender", daemon=True)
        self._thread.start()

    def put(self, tracked: TrackedSender, output: EngineOutput) -> None:
        self._queue.put((tracked, output))

    def _drain(self) -> tuple[list[tuple[TrackedSender, EngineOutput]], bool]:
        """Everything queued now (blocking for the first); True once the stop marker was seen."""
        first = self._queue.get()
        if first is None:
            return [], True
        entries = [first]
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return entries, False
            if entry is None:
                return entries, True
            entries.append(entry)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            entries, stopping = self._drain()
            self.outputs += len(entries)
            for tracked, output in coalesce(entries):
                self.responses += 1
                try:
                    self._deliver(tracked, output)
                except Exception:
                    log.info("could not send to %s (client gone?)", tracked.engine_id)
                    try:
                        self._on_failure(tracked)
                    except Exception:
                        log.exception("failure handler of %s failed", tracked.engine_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=timeout)


class CancelMonitor:
    """Polls the senders of the requests in flight and reports those whose client left.

    One thread for all requests, so no cancellation check (an IPC round trip each) sits on the
    engine's hot path; a cancelled request is dropped within a poll interval plus a decode step. The
    interval stretches with the time a round of checks takes (at most ``busy_share`` of the thread's
    time goes to checking), so many requests in flight do not keep a core of a small machine busy
    answering ``is_cancelled`` round trips.
    """

    def __init__(
        self, poll_seconds: float, on_cancel: Callable[[TrackedSender], None], busy_share: float = 0.2
    ) -> None:
        self._poll_seconds = poll_seconds
        self._busy_share = busy_share
        self.interval = poll_seconds  # the current wait between two rounds
        self._on_cancel = on_cancel
        self._active: dict[str, TrackedSender] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-cancel-monitor", daemon=True)
        self._thread.start()

    def watch(self, tracked: TrackedSender) -> None:
        with self._lock:
            self._active[tracked.engine_id] = tracked

    def forget(self, engine_id: str) -> None:
        with self._lock:
            self._active.pop(engine_id, None)

    @property
    def watched(self) -> int:
        with self._lock:
            return len(self._active)

    def poll_once(self) -> None:
        """Check every watched request once."""
        with self._lock:
            items = list(self._active.values())
        for tracked in items:
            if tracked.poll_cancelled():
                try:
                    self._on_cancel(tracked)
                except Exception:
                    log.exception("could not cancel %s", tracked.engine_id)

    def next_interval(self, round_seconds: float) -> float:
        """The wait after a round of checks that took ``round_seconds``."""
        return max(self._poll_seconds, round_seconds * (1 - self._busy_share) / self._busy_share)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.monotonic()
            self.poll_once()
            self.interval = self.next_interval(time.monotonic() - started)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
