"""The OpenAI Batch file formats.

Input: one JSON object per line, ``{"custom_id", "method": "POST", "url", "body"}``; blank lines are
skipped (their numbers still count, so errors name the line of the file). Output: one record per
request, ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. A request
the API answered (successfully or with an HTTP error) has a ``response`` and ``error: null``; a line that
could not be sent at all (not JSON, no ``custom_id``, a wrong ``url``...) has ``response: null`` and an
``error`` shaped like OpenAI's batch errors, ``{"code", "message", "param", "line"}``.

An output file is append-only and a record counts once its terminating newline is written:
:func:`scan_output` drops a partially written last line (a process killed mid-write) and returns what is
done, so a rerun resumes without redoing, losing or duplicating any request.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL)
_LINE_KEYS = ("custom_id", "method", "url", "body")
_MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class LineError:
    """Why a line cannot be sent (OpenAI's batch error object)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class BatchLine:
    """One request line: ``line`` is its 1-based number in the file; ``error`` is set when the line cannot
    be sent (then ``custom_id`` is whatever could be read, possibly ``None``)."""

    line: int
    custom_id: str | None
    url: str | None = None
    body: dict[str, Any] | None = None
    error: LineError | None = None

    @property
    def key(self) -> str:
        """What identifies the line in an output file: its ``custom_id``, else its line number."""
        return self.custom_id if self.custom_id is not None else f"line:{self.line}"


def parse_line(text: str | bytes, line: int, endpoint: str | None = None) -> BatchLine:
    """Parse one input line. ``endpoint``: the only ``url`` allowed (a Batch API batch's endpoint)."""

    def bad(code: str, message: str, param: str | None = None, custom_id: str | None = None) -> BatchLine:
        return BatchLine(line, custom_id, error=LineError(code, f"Line {line}: {message}", param, line))

    try:
        item = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return bad("invalid_json_line", f"not a valid JSON object ({exc}).")
    if not isinstance(item, dict):
        return bad("invalid_json_line", "not a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_required_parameter", "'custom_id' must be a non-empty string.", "custom_id")
    if len(custom_id) > _MAX_CUSTOM_ID:
        return bad("invalid_value", f"'custom_id' is longer than {_MAX_CUSTOM_ID} characters.", "custom_id")
    extra = sorted(set(item) - set(_LINE_KEYS))
    if extra:
        return bad("invalid_request", f"unrecognized field '{extra[0]}'.", extra[0], custom_id)
    for key in ("method", "url", "body"):
        if key not in item:
            return bad("missing_required_parameter", f"'{key}' is required.", key, custom_id)
    if item["method"] != "POST":
        return bad("invalid_value", f"'method' must be 'POST', not {item['method']!r}.", "method", custom_id)
    url = item["url"]
    if url not in SUPPORTED_URLS:
        allowed = " or ".join(repr(u) for u in SUPPORTED_URLS)
        return bad("invalid_url", f"'url' must be {allowed}, not {url!r}.", "url", custom_id)
    if endpoint is not None and url != endpoint:
        message = f"'url' {url!r} does not match the batch's endpoint {endpoint!r}."
        return bad("mismatched_endpoint", message, "url", custom_id)
    if not isinstance(item["body"], dict):
        return bad("invalid_value", "'body' must be a JSON object.", "body", custom_id)
    return BatchLine(line, custom_id, url, item["body"])


def read_lines(path: str | os.PathLike[str], endpoint: str | None = None) -> Iterator[BatchLine]:
    """The request lines of a file, in order, parsed one at a time (blank lines skipped)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield parse_line(raw, number, endpoint)


@dataclass
class InputSummary:
    """What a first pass over an input file found: request count and duplicate ``custom_id`` s."""

    requests: int = 0
    duplicates: list[tuple[str, int]] = field(default_factory=list)  # (custom_id, line) of repeats
    keys: set[str] = field(default_factory=set)


def survey_input(path: str | os.PathLike[str], endpoint: str | None = None) -> InputSummary:
    """Count the requests of an input file and find repeated ``custom_id`` s (a file-level error: results
    are matched to requests by ``custom_id``)."""
    summary = InputSummary()
    for item in read_lines(path, endpoint):
        summary.requests += 1
        if item.key in summary.keys:
            summary.duplicates.append((item.key, item.line))
        summary.keys.add(item.key)
    return summary


def new_record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_record(custom_id: str | None, status_code: int, request_id: str, body: Any) -> dict[str, Any]:
    """The output record of a request the API answered (with a success or an HTTP error)."""
    response = {"status_code": status_code, "request_id": request_id, "body": body}
    return {"id": new_record_id(), "custom_id": custom_id, "response": response, "error": None}


def error_record(custom_id: str | None, error: LineError) -> dict[str, Any]:
    """The output record of a line that could not be sent."""
    return {"id": new_record_id(), "custom_id": custom_id, "response": None, "error": error.to_dict()}


def record_key(record: dict[str, Any]) -> str | None:
    """The key (see :attr:`BatchLine.key`) of an output record, ``None`` if it names no request."""
    custom_id = record.get("custom_id")
    if isinstance(custom_id, str) and custom_id:
        return custom_id
    error = record.get("error")
    if isinstance(error, dict) and isinstance(error.get("line"), int):
        return f"line:{error['line']}"
    return None


def record_ok(record: dict[str, Any]) -> bool:
    """Whether a record is a successful (HTTP 200) response."""
    response = record.get("response")
    return isinstance(response, dict) and response.get("status_code") == 200 and record.get("error") is None


def encode_record(record: dict[str, Any]) -> bytes:
    """One output line (compact JSON, non-ASCII kept, newline-terminated)."""
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class OutputFileError(Exception):
    """An output file that cannot be resumed (a damaged line before the end, or not an output file)."""


@dataclass
class OutputState:
    """What an existing output file holds: the keys done and the length of its complete lines."""

    done: set[str] = field(default_factory=set)
    ok: int = 0
    failed: int = 0
    valid_bytes: int = 0
    dropped_bytes: int = 0  # a partial last line, cut off by :func:`scan_output`


def scan_output(path: str | os.PathLike[str], repair: bool = True) -> OutputState:
    """Read an output file: every complete record's key. A last line without its newline is a write that
    was interrupted: with ``repair`` it is truncated away (its request is redone). Raises
    :class:`OutputFileError` for a complete line that is not a record, or a key seen twice."""
    state = OutputState()
    target = Path(path)
    if not target.exists():
        return state
    with open(target, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    state.valid_bytes, state.dropped_bytes = end, len(data) - end
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OutputFileError(f"{target}: line {number} is not JSON ({exc})") from None
        key = record_key(record) if isinstance(record, dict) else None
        if key is None:
            raise OutputFileError(f"{target}: line {number} is not a batch output record")
        if key in state.done:
            raise OutputFileError(f"{target}: line {number} repeats the result of {key!r}")
        state.done.add(key)
        if record_ok(record):
            state.ok += 1
        else:
            state.failed += 1
    if repair and state.dropped_bytes:
        with open(target, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return state


def request_tokens(body: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of a response body's ``usage`` (0, 0 without one)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
