"""A progress bar for batch runs (no dependency): requests done, requests/s, tokens/s, ETA.

On a terminal the bar is redrawn in place at most ``refresh_s`` apart; otherwise (a log file, CI) a
plain line is written every ``log_every_s``. Rates count only the requests of this run (a resumed run's
earlier results are in the totals, not in the rates).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``1h02m03s``, ``4m05s``, ``6s`` (``?`` when unknown)."""
    if seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass
class BatchStats:
    """Counts of a run; ``resumed`` results were already in the output before it started."""

    total: int
    resumed: int = 0
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def done(self) -> int:
        return self.resumed + self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def requests_per_s(self) -> float:
        elapsed = self.elapsed
        return (self.ok + self.failed) / elapsed if elapsed > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        elapsed = self.elapsed
        return self.completion_tokens / elapsed if elapsed > 0 else 0.0

    def add(self, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def summary(self) -> str:
        """The end-of-run summary (several lines)."""
        ran = self.ok + self.failed
        lines = [
            f"{self.done}/{self.total} requests done: {ran} in this run "
            f"({self.ok} ok, {self.failed} failed) in {format_duration(self.elapsed)}"
            + (f", {self.resumed} already done before" if self.resumed else ""),
            f"{self.requests_per_s:.2f} requests/s, {self.tokens_per_s:.1f} completion tokens/s "
            f"({self.prompt_tokens} prompt + {self.completion_tokens} completion tokens)",
        ]
        return "\n".join(lines)


class ProgressBar:
    """Draws :class:`BatchStats` on ``stream`` (stderr by default)."""

    def __init__(
        self,
        stats: BatchStats,
        stream: TextIO | None = None,
        enabled: bool = True,
        refresh_s: float = 0.2,
        log_every_s: float = 10.0,
        label: str = "batch",
    ) -> None:
        self.stats = stats
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = refresh_s if self.tty else log_every_s
        self.label = label
        self._last = 0.0
        self._drawn = False

    def line(self) -> str:
        """The current status line."""
        s = self.stats
        fraction = s.done / s.total if s.total else 1.0
        filled = int(fraction * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        rate = s.requests_per_s
        eta = (s.total - s.done) / rate if rate > 0 else float("nan")
        failed = f"  {s.failed} failed" if s.failed else ""
        return (
            f"{self.label} [{bar}] {s.done}/{s.total} {fraction:4.0%}  {rate:.2f} req/s  "
            f"{s.tokens_per_s:.0f} tok/s  ETA {format_duration(eta)}{failed}"
        )

    def update(self, force: bool = False) -> None:
        """Redraw if ``refresh_s`` (terminal) or ``log_every_s`` passed since the last time."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
            self._drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        self.update(force=True)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
