"""Run many jobs with a bounded, adjustable number in flight.

:func:`run_jobs` takes jobs lazily from an iterator (an input file of any size is never held in
memory), keeps up to ``limit.current()`` of them running, and calls ``done`` for each result inside
the job's task, so a job counts as in flight until its result is recorded. When the limit drops below
the number running and ``preempt`` is set, the most recently started jobs are cancelled and put back at
the head of the queue (they have done the least work); a job whose result is being recorded is never
cancelled. The first exception of a job (or of ``done``) cancels the others and is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Limit(Protocol):
    """How many jobs may run now, and a way to wait until that may have changed."""

    def current(self) -> int: ...

    async def changed(self) -> None: ...


class FixedLimit:
    """A constant limit."""

    def __init__(self, value: int) -> None:
        if value < 1:
            raise ValueError("the concurrency must be at least 1")
        self.value = value

    def current(self) -> int:
        return self.value

    async def changed(self) -> None:
        await asyncio.Event().wait()  # never


@dataclass
class _Running(Generic[T]):
    job: T
    order: int
    recording: bool = False


@dataclass
class SchedulerStats:
    """Counters of one :func:`run_jobs` call."""

    started: int = 0
    finished: int = 0
    preempted: int = 0
    max_in_flight: int = 0


async def run_jobs(
    jobs: Iterator[T],
    work: Callable[[T], Awaitable[R]],
    done: Callable[[T, R], Awaitable[None] | None],
    limit: Limit,
    *,
    preempt: bool = False,
    stats: SchedulerStats | None = None,
) -> SchedulerStats:
    """Run ``work(job)`` for every job, at most ``limit.current()`` at a time; ``done(job, result)`` records
    each result (see the module docstring)."""
    stats = stats or SchedulerStats()
    requeued: deque[T] = deque()
    running: dict[asyncio.Task[None], _Running[T]] = {}
    exhausted = False
    counter = 0

    async def one(entry: _Running[T]) -> None:
        result = await work(entry.job)
        entry.recording = True
        outcome = done(entry.job, result)
        if outcome is not None:
            await outcome

    def next_job() -> T | None:
        nonlocal exhausted
        if requeued:
            return requeued.popleft()
        if exhausted:
            return None
        try:
            return next(jobs)
        except StopIteration:
            exhausted = True
            return None

    waiter: asyncio.Task[None] | None = None
    try:
        while True:
            allowed = max(limit.current(), 0)
            while len(running) < allowed:
                job = next_job()
                if job is None:
                    break
                counter += 1
                entry = _Running(job, counter)
                running[asyncio.create_task(one(entry))] = entry
                stats.started += 1
            stats.max_in_flight = max(stats.max_in_flight, len(running))
            if preempt and len(running) > allowed:
                youngest = sorted(
                    (t for t, e in running.items() if not e.recording), key=lambda t: -running[t].order
                )
                for task in youngest[: len(running) - allowed]:
                    task.cancel()
            if not running and exhausted and not requeued:
                return stats
            if waiter is None or waiter.done():
                waiter = asyncio.create_task(limit.changed())
            finished, _ = await asyncio.wait([*running, waiter], return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                if task is waiter:
                    continue
                entry = running.pop(task)
                if task.cancelled():
                    requeued.appendleft(entry.job)
                    stats.preempted += 1
                    continue
                error = task.exception()
                if error is not None:
                    raise error
                stats.finished += 1
    finally:
        pending = [*running, *([waiter] if waiter is not None else [])]
        for task in pending:
            task.cancel()
        if pending:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(pending)
        for task in running:
            if not task.cancelled():
                task.exception()  # retrieved: nothing logged as "never retrieved"
