"""The idempotency record: train ``request_id`` → the step it applied, on disk, appended to.

One SQLite database (``DPO_CHECKPOINT_DIR/idempotency.sqlite``, WAL journal,
``synchronous=FULL``: a committed append survives a crash or power loss) with one row per
remembered step: ``(seq, request_id, new_version, body)``, ``body`` the JSON the engine gives
(the result and the request digest). Appending costs one small transaction per checkpoint
whatever the record's size, where the former format rewrote the whole record into every
checkpoint (issue 10, item 14).

The record and the checkpoints agree through versions: the engine appends a step's row
*before* the checkpoint that holds the step is committed; on resume at version ``V`` it loads
only the rows of steps up to ``V`` (a newer row belongs to a step lost with the state that was
not checkpointed, or to a newer checkpoint that did not verify and is kept on disk: its id
must not answer as applied), and its first append deletes the rows newer than ``V`` in the
same transaction (this process's steps from ``V + 1`` on replace that history). The record
keeps the ``capacity`` newest rows.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpo_service.state.format import CheckpointError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    new_version INTEGER NOT NULL,
    body TEXT NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS steps_by_version ON steps (new_version)"
_UPSERT = (
    "INSERT INTO steps (request_id, new_version, body) VALUES (?, ?, ?) "
    "ON CONFLICT(request_id) DO UPDATE SET new_version = excluded.new_version, "
    "body = excluded.body"
)
_TRIM = "DELETE FROM steps WHERE seq < (SELECT seq FROM steps ORDER BY seq DESC LIMIT 1 OFFSET ?)"

Row = tuple[str, int, dict[str, Any]]  # request_id, new model version, body


class IdempotencyRecord:
    """The on-disk record (thread-safe: one lock around the one connection)."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = max(1, capacity)
        self.rows_written = 0  # rows appended by this process (tests and benchmarks)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            self._db.execute(_INDEX)
        except sqlite3.Error as exc:
            raise CheckpointError(
                f"idempotency record {path} cannot be opened ({exc}); move it aside to start "
                "without it (retries of earlier request ids would then apply new steps)"
            ) from None

    def _write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> int:
        """Run ``statements`` in one transaction; an I/O failure raises ``OSError``."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    changed = 0
                    for sql, args in statements:
                        changed += self._db.execute(sql, args).rowcount
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite rolls back itself on a full disk
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                code = errno.ENOSPC if "full" in str(exc) else errno.EIO
                raise OSError(
                    code, f"{os.strerror(code)}: idempotency record {self.path} ({exc})"
                ) from None
        return changed

    def append(self, rows: Sequence[Row], *, after: int) -> None:
        """One transaction: delete the rows of steps newer than ``after`` (another history),
        add (or replace) ``rows`` (all newer than ``after``), drop the oldest beyond the
        capacity."""
        upserts = [
            (_UPSERT, (rid, int(v), json.dumps(body, sort_keys=True))) for rid, v, body in rows
        ]
        newer = ("DELETE FROM steps WHERE new_version > ?", (after,))
        self._write([newer, *upserts, (_TRIM, (self.capacity - 1,))])
        self.rows_written += len(rows)

    def replace_all(self, rows: Sequence[Row]) -> None:
        """Make ``rows`` the whole record (a format-1 checkpoint's record, imported)."""
        upserts = [
            (_UPSERT, (rid, int(v), json.dumps(body, sort_keys=True))) for rid, v, body in rows
        ]
        self._write([("DELETE FROM steps", ()), *upserts, (_TRIM, (self.capacity - 1,))])
        self.rows_written += len(rows)

    def load(self, upto: int | None = None) -> list[tuple[str, Any]]:
        """The rows of steps up to version ``upto`` (all when None) as ``(request_id,
        body)``, oldest first (a body that is not JSON comes back as its text: the engine
        skips what it cannot read)."""
        limit = (1 << 62) if upto is None else upto
        with self._lock:
            try:
                found = self._db.execute(
                    "SELECT request_id, body FROM steps WHERE new_version <= ? ORDER BY seq",
                    (limit,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise CheckpointError(
                    f"idempotency record {self.path} is unreadable ({exc})"
                ) from None
        out: list[tuple[str, Any]] = []
        for rid, body in found:
            try:
                out.append((str(rid), json.loads(body)))
            except (TypeError, ValueError):
                out.append((str(rid), body))
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
