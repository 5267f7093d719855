"""The Batch API's state: files and batches in an embedded SQLite database, file contents on disk.

Layout of the state folder: ``batches.sqlite3`` (WAL journal), ``files/<file id>`` (uploaded inputs and
the output/error files of finished batches) and ``.lock``, an exclusive ``flock`` held while a server
uses the folder (two servers would run the same batches twice).

A request's result is a row of ``results`` keyed by (batch, input line) and inserted in the same
transaction that counts it, so a batch's counts always match its results and a result recorded twice
(a request redone after a crash) is kept once. Finalizing writes the output and error files from those
rows in input order, then records them and the batch's new status in one transaction: a crash at any
point leaves a state that the worker resumes from.

All methods are blocking (call them in a thread from async code); one connection, one lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DB_NAME = "batches.sqlite3"
COMPLETION_WINDOW_S = 24 * 3600
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
FINAL_STATUSES = ("failed", "completed", "expired", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    model TEXT,
    metadata TEXT,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    in_progress_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
);
"""
_INSERT_FILE = (
    "INSERT OR REPLACE INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?)"
)
_TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
# The timestamp a status sets when the batch enters it.
_STATUS_TIMESTAMP = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


class StoreBusyError(RuntimeError):
    """Another process holds the state folder."""


def _now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class FileRow:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int

    def to_api(self) -> dict[str, Any]:
        """The OpenAI ``file`` object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass
class BatchRow:
    id: str
    status: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    model: str | None = None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    expires_at: int | None = None
    times: dict[str, int | None] = field(default_factory=dict)
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def to_api(self) -> dict[str, Any]:
        """The OpenAI ``batch`` object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            **{name: self.times.get(name) for name in _TIMESTAMPS},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            "metadata": self.metadata,
        }


def _batch_from_row(row: sqlite3.Row) -> BatchRow:
    return BatchRow(
        id=row["id"],
        status=row["status"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        created_at=row["created_at"],
        model=row["model"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        errors=json.loads(row["errors"]) if row["errors"] else None,
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        expires_at=row["expires_at"],
        times={name: row[name] for name in _TIMESTAMPS},
        total=row["total"],
        completed=row["completed"],
        failed=row["failed"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
    )


def _file_from_row(row: sqlite3.Row) -> FileRow:
    return FileRow(row["id"], row["filename"], row["purpose"], row["bytes"], row["created_at"])


class BatchStore:
    """Files and batches under one state folder (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.files_dir = self.directory / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / ".lock", "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreBusyError(
                f"another tritonvlm server uses the batch state folder {self.directory}"
            ) from None
        for leftover in self.files_dir.glob(".tmp-*"):  # files being written when a server stopped
            leftover.unlink(missing_ok=True)
        self._db = sqlite3.connect(self.directory / DB_NAME, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._mutex = threading.Lock()

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        self._lock_file.close()  # releases the flock

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._mutex:
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ files
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, source: Path, filename: str, purpose: str, file_id: str | None = None) -> FileRow:
        """Move ``source`` (a finished file on the same file system) into the store and record it."""
        file_id = file_id or new_id("file-")
        target = self.file_path(file_id)
        size = source.stat().st_size
        os.replace(source, target)
        row = FileRow(file_id, filename, purpose, size, _now())
        with self._transaction() as db:
            db.execute(
                _INSERT_FILE,
                (row.id, row.filename, row.purpose, row.bytes, row.created_at),
            )
        return row

    def temp_path(self) -> Path:
        """A fresh path in the store's folder for a file being written (then :meth:`add_file`)."""
        return self.files_dir / f".tmp-{secrets.token_hex(8)}"

    def get_file(self, file_id: str) -> FileRow | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return _file_from_row(rows[0]) if rows else None

    def list_files(
        self, purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc"
    ) -> tuple[list[FileRow], bool]:
        """Files newest first (``order="asc"``: oldest first), after the cursor ``after``; and whether
        more follow."""
        sql, params = "SELECT * FROM files WHERE 1=1", []
        if purpose:
            sql += " AND purpose = ?"
            params.append(purpose)
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        if after:
            sql += f" AND seq {op} COALESCE((SELECT seq FROM files WHERE id = ?), seq)"
            params.append(after)
        sql += f" ORDER BY seq {direction} LIMIT ?"
        params.append(limit + 1)
        rows = self._query(sql, tuple(params))
        return [_file_from_row(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        with contextlib.suppress(FileNotFoundError):
            self.file_path(file_id).unlink()
        return bool(deleted)

    # ------------------------------------------------------------------ batches
    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        model: str | None,
    ) -> BatchRow:
        created = _now()
        row = BatchRow(
            id=new_id("batch_"),
            status="validating",
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            created_at=created,
            model=model,
            metadata=metadata,
            expires_at=created + COMPLETION_WINDOW_S,
        )
        with self._transaction() as db:
            db.execute(
                "INSERT INTO batches (id, status, endpoint, input_file_id, completion_window, model, "
                "metadata, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.id,
                    row.status,
                    endpoint,
                    input_file_id,
                    completion_window,
                    model,
                    json.dumps(metadata) if metadata is not None else None,
                    created,
                    row.expires_at,
                ),
            )
        return row

    def get_batch(self, batch_id: str) -> BatchRow | None:
        rows = self._query("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch_from_row(rows[0]) if rows else None

    def list_batches(self, limit: int = 20, after: str | None = None) -> tuple[list[BatchRow], bool]:
        """Batches newest first, after the cursor ``after``; and whether more follow."""
        sql, params = "SELECT * FROM batches", []
        if after:
            sql += " WHERE seq < COALESCE((SELECT seq FROM batches WHERE id = ?), seq)"
            params.append(after)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit + 1)
        rows = self._query(sql, tuple(params))
        return [_batch_from_row(r) for r in rows[:limit]], len(rows) > limit

    def next_active(self) -> BatchRow | None:
        """The oldest batch that still has work (validating, in progress, finalizing or cancelling)."""
        marks = ",".join("?" for _ in ACTIVE_STATUSES)
        rows = self._query(
            f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq ASC LIMIT 1", ACTIVE_STATUSES
        )
        return _batch_from_row(rows[0]) if rows else None

    def set_status(
        self, batch_id: str, status: str, *, only_from: tuple[str, ...] | None = None, **fields: Any
    ) -> BatchRow | None:
        """Move a batch to ``status`` (setting its timestamp and ``fields``), only from ``only_from``
        statuses if given; returns the batch after the change, ``None`` if it did not apply."""
        updates = {"status": status, **fields}
        stamp = _STATUS_TIMESTAMP.get(status)
        if stamp:
            updates[stamp] = _now()
        for key in ("errors", "metadata"):
            if key in updates and updates[key] is not None:
                updates[key] = json.dumps(updates[key])
        sets = ", ".join(f"{k} = ?" for k in updates)
        sql, params = f"UPDATE batches SET {sets} WHERE id = ?", [*updates.values(), batch_id]
        if only_from:
            sql += f" AND status IN ({','.join('?' for _ in only_from)})"
            params.extend(only_from)
        with self._transaction() as db:
            changed = db.execute(sql, tuple(params)).rowcount
        return self.get_batch(batch_id) if changed else None

    # ------------------------------------------------------------------ results
    def add_result(
        self, batch_id: str, line: int, ok: bool, record: dict[str, Any], tokens: tuple[int, int] = (0, 0)
    ) -> bool:
        """Record a request's result once (a repeat is ignored) and count it; whether it was new."""
        with self._transaction() as db:
            new = db.execute(
                "INSERT OR IGNORE INTO results (batch_id, line, ok, record) VALUES (?, ?, ?, ?)",
                (batch_id, line, int(ok), json.dumps(record, ensure_ascii=False, separators=(",", ":"))),
            ).rowcount
            if new:
                db.execute(
                    "UPDATE batches SET completed = completed + ?, failed = failed + ?, "
                    "input_tokens = input_tokens + ?, output_tokens = output_tokens + ? WHERE id = ?",
                    (int(ok), int(not ok), tokens[0], tokens[1], batch_id),
                )
        return bool(new)

    def done_lines(self, batch_id: str) -> set[int]:
        return {r["line"] for r in self._query("SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def results(self, batch_id: str) -> Iterator[tuple[int, bool, str]]:
        """(line, ok, record JSON) of a batch's results in input order."""
        for row in self._query(
            "SELECT line, ok, record FROM results WHERE batch_id = ? ORDER BY line", (batch_id,)
        ):
            yield row["line"], bool(row["ok"]), row["record"]

    def finalize(
        self, batch_id: str, status: str, extra_failed: list[tuple[int, str]] = ()
    ) -> BatchRow | None:
        """Write the output and error files of a batch from its results (plus ``extra_failed`` records,
        e.g. expired requests), record them and move the batch to ``status``, in one transaction."""
        outputs = {True: self.temp_path(), False: self.temp_path()}
        counts = {True: 0, False: 0}
        lines = sorted(
            [(line, ok, rec) for line, ok, rec in self.results(batch_id)]
            + [(line, False, rec) for line, rec in extra_failed]
        )
        handles = {ok: open(path, "wb") for ok, path in outputs.items()}  # noqa: SIM115
        try:
            for _, ok, record in lines:
                handles[ok].write(record.encode("utf-8") + b"\n")
                counts[ok] += 1
        finally:
            for handle in handles.values():
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
        ids = {
            True: f"file-{batch_id.removeprefix('batch_')}-output",
            False: f"file-{batch_id.removeprefix('batch_')}-errors",
        }
        names = {True: f"{batch_id}_output.jsonl", False: f"{batch_id}_error.jsonl"}
        created = _now()
        with self._transaction() as db:
            for ok in (True, False):
                if not counts[ok]:
                    outputs[ok].unlink()
                    continue
                target = self.file_path(ids[ok])
                os.replace(outputs[ok], target)
                db.execute(
                    _INSERT_FILE,
                    (ids[ok], names[ok], "batch_output", target.stat().st_size, created),
                )
            stamp = _STATUS_TIMESTAMP[status]
            db.execute(
                f"UPDATE batches SET status = ?, {stamp} = ?, output_file_id = ?, error_file_id = ?, "
                "failed = failed + ? WHERE id = ?",
                (
                    status,
                    created,
                    ids[True] if counts[True] else None,
                    ids[False] if counts[False] else None,
                    len(extra_failed),
                    batch_id,
                ),
            )
        return self.get_batch(batch_id)
