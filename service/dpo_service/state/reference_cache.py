"""A persistent cache of reference log-probs: an embedded SQLite database (issue 14, item 4).

One row per scored sequence::

    key  = blake2b-256( identity | tokenizer | prompt ids | response ids )   (canonical bytes)
    row  = (key, logp float64 as 8 bytes, tokens, last_used, check)

- ``identity`` names the reference model and everything that changes its numbers (weights
  digest, compute dtype, device type, kind: see :func:`reference_identity`); ``tokenizer``
  names the tokenizer. Both are part of the key, so a cache built for other weights, another
  dtype or another tokenizer simply has no rows for this one: it is never used.
- Only the 256-bit hash is stored, not the raw parts: an accidental collision needs about
  2^128 rows (birthday bound), and clients cannot craft one (blake2b is collision resistant).
- ``check`` is a 63-bit hash of the key, the value's float64 bytes and the token count: a row
  whose value was damaged on disk fails it and is dropped, never returned.
- Bounded by ``max_entries``: after a write that passes the bound, the least recently used
  rows (``last_used``, bumped on every hit) are deleted down to 95 % of it.
- A file that is not SQLite, fails ``PRAGMA quick_check``, lacks the tables or carries
  another :data:`SCHEMA_VERSION` is renamed aside (``<name>.bad-<time>``) with a log line and
  a fresh cache is created; when even that fails the cache is off for the run. A read error
  later turns the cache off for the run (every lookup a miss); a failed write is logged once,
  counted, and the request goes on. No error here ever fails a request.

Thread-safe (one connection, one lock; WAL so a second process, e.g. ``precompute-reference``,
can read and write the same file). Imports nothing from the engine or the models.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = "dpo-reference-cache/1"
#: Rows looked up per SELECT (SQLite's default limit on bound parameters is 32766).
_CHUNK = 500
_LOW_WATER = 0.95  # eviction deletes down to this fraction of the bound


def reference_identity(
    weights_digest: str, *, kind: str, compute_dtype: str, device_type: str
) -> str:
    """The identity string of a reference model, part of every cache key.

    ``weights_digest``: a digest of the reference's weight bytes (the service: blake2b of
    the frozen copy's ``state_dict``, see ``engine/reference_lookup.py``); ``kind``: what
    the reference is (``frozen`` for the initial-weights copy; a LoRA session's reference is
    ``adapter-off``, the base with the adapter switched off, so sessions on one base share
    rows); ``compute_dtype`` / ``device_type``: bf16 or fp16 compute and another device give
    other numbers. Example: ``frozen:blake2b=ab12…;dtype=float32;device=cpu``.
    """
    return f"{kind}:blake2b={weights_digest};dtype={compute_dtype};device={device_type}"


def _ids(ids: Sequence[int]) -> bytes:
    return struct.pack(f"<I{len(ids)}q", len(ids), *ids)


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def sequence_key(
    identity: str, tokenizer: str, prompt: Sequence[int], response: Sequence[int]
) -> bytes:
    """The 32-byte key of one (reference, tokenizer, prompt, response): a blake2b-256 of a
    length-prefixed encoding of the four parts (no two different inputs share an encoding)."""
    h = hashlib.blake2b(digest_size=32, person=b"dpo-refcache-v1")
    for part in (_text(identity), _text(tokenizer), _ids(prompt), _ids(response)):
        h.update(part)
    return h.digest()


def _row_check(key: bytes, logp: float, tokens: int) -> int:
    digest = hashlib.blake2b(key + struct.pack("<dq", logp, tokens), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # fits SQLite's signed 64-bit INTEGER


def _unpack(raw: object) -> float | None:
    """The float64 stored as 8 little-endian bytes (a BLOB: SQLite's REAL would turn -0.0
    into 0); None for anything else."""
    if isinstance(raw, bytes) and len(raw) == 8:
        return float(struct.unpack("<d", raw)[0])
    return None


@dataclass(frozen=True)
class CachedLogp:
    """One stored value: the reference's summed log-prob of a response and its token count."""

    logp: float
    tokens: int


class CacheEvents:
    """Counters the cache reports to (the engine passes one wired to Prometheus)."""

    def on_hits(self, n: int) -> None: ...
    def on_misses(self, n: int) -> None: ...
    def on_error(self, what: str) -> None: ...
    def on_evicted(self, n: int) -> None: ...
    def on_size(self, entries: int, size_bytes: int) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS logps (
    key BLOB PRIMARY KEY, logp BLOB NOT NULL, tokens INTEGER NOT NULL,
    last_used INTEGER NOT NULL, check_sum INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS logps_last_used ON logps (last_used);
"""
_COLUMNS = ["key", "logp", "tokens", "last_used", "check_sum"]


class ForeignCacheError(Exception):
    """The file is SQLite but not a cache of this schema."""


class ReferenceCache:
    """The SQLite reference log-prob cache at ``path`` (see the module docstring)."""

    def __init__(
        self, path: Path, *, max_entries: int, events: CacheEvents | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.max_entries = max_entries
        self.events = events or CacheEvents()
        self._clock = clock
        self._lock = threading.Lock()
        self._write_failed = False
        self.entries = 0
        self._db: sqlite3.Connection | None = self._open()
        self._report_size()

    # ----------------------------------------------------------------- opening
    @property
    def enabled(self) -> bool:
        return self._db is not None

    def _open(self) -> sqlite3.Connection | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                try:
                    return self._connect_existing()
                except (sqlite3.Error, ForeignCacheError) as exc:
                    self._set_aside(exc)
            return self._create()
        except (sqlite3.Error, OSError) as exc:
            log.warning("reference cache %s is off for this run: %s", self.path, exc)
            self.events.on_error("open")
            return None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA busy_timeout = 5000")
        # WAL + NORMAL: a commit does not fsync; a power cut may lose the last rows (a cache:
        # recomputed), never corrupt the file
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def _connect_existing(self) -> sqlite3.Connection:
        db = self._connect()
        try:
            status = db.execute("PRAGMA quick_check").fetchone()
            if status is None or status[0] != "ok":
                raise ForeignCacheError(f"quick_check failed: {status}")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if not {"meta", "logps"} <= tables:
                raise ForeignCacheError(f"not a reference cache (tables {sorted(tables)})")
            row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                raise ForeignCacheError(f"schema {row and row[0]!r}, expected {SCHEMA_VERSION!r}")
            columns = [r[1] for r in db.execute("PRAGMA table_info(logps)")]
            if columns != _COLUMNS:
                raise ForeignCacheError(f"logps columns {columns}")
            db.execute("PRAGMA journal_mode = WAL")
            self.entries = int(db.execute("SELECT COUNT(*) FROM logps").fetchone()[0])
        except BaseException:
            db.close()
            raise
        log.info("reference cache %s: %d entries", self.path, self.entries)
        return db

    def _create(self) -> sqlite3.Connection:
        db = self._connect()
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
        with db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self.entries = 0
        log.info("reference cache %s: created", self.path)
        return db

    def _set_aside(self, exc: BaseException) -> None:
        """Rename a corrupt or foreign file (and its WAL/SHM) out of the way."""
        aside = self.path.with_name(f"{self.path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
        log.warning(
            "reference cache %s is unusable (%s: %s); moved aside to %s, starting empty",
            self.path, type(exc).__name__, exc, aside.name,
        )  # fmt: skip
        self.events.on_error("corrupt")
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.replace(aside.with_name(aside.name + suffix))
        self.path.replace(aside)

    # ----------------------------------------------------------------- lookups
    def get_many(self, keys: Sequence[bytes]) -> list[CachedLogp | None]:
        """The stored values of ``keys`` (None for a miss); bumps the hits' ``last_used``.
        Never raises: a read error turns the cache off (all misses from then on)."""
        found: dict[bytes, CachedLogp] = {}
        db = self._db
        if db is not None and keys:
            try:
                with self._lock:
                    found = self._select(db, keys)
            except sqlite3.Error as exc:
                self._read_failed(exc)
                found = {}
        out = [found.get(k) for k in keys]
        hits = sum(v is not None for v in out)
        self.events.on_hits(hits)
        self.events.on_misses(len(keys) - hits)
        return out

    def _select(self, db: sqlite3.Connection, keys: Sequence[bytes]) -> dict[bytes, CachedLogp]:
        unique = list(dict.fromkeys(keys))
        found: dict[bytes, CachedLogp] = {}
        bad: list[bytes] = []
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, logp, tokens, check_sum FROM logps WHERE key IN ({marks})"
            for key, logp, tokens, check in db.execute(query, chunk):
                value = _unpack(logp)
                if value is not None and check == _row_check(key, value, int(tokens)):
                    found[bytes(key)] = CachedLogp(value, int(tokens))
                else:
                    bad.append(bytes(key))
        if bad:
            log.warning("reference cache: %d damaged rows ignored and dropped", len(bad))
            self.events.on_error("damaged_row")
        self._touch(db, list(found), bad)
        return found

    def _touch(self, db: sqlite3.Connection, hits: list[bytes], bad: list[bytes]) -> None:
        if not hits and not bad:
            return
        now = self._clock()
        try:
            with db:
                db.executemany(
                    "UPDATE logps SET last_used = ? WHERE key = ?", [(now, k) for k in hits]
                )
                db.executemany("DELETE FROM logps WHERE key = ?", [(k,) for k in bad])
        except sqlite3.Error as exc:
            self._write_error(exc)

    def _read_failed(self, exc: BaseException) -> None:
        log.error("reference cache %s: read failed (%s); cache off for this run", self.path, exc)
        self.events.on_error("read")
        self.close()

    # ----------------------------------------------------------------- writes
    def put_many(self, items: Sequence[tuple[bytes, float, int]]) -> None:
        """Store ``(key, logp, tokens)`` rows (existing keys keep their value), then evict
        down to the bound. Never raises: a failed write is logged once and counted."""
        db = self._db
        if db is None or not items:
            return
        now = self._clock()
        rows = [
            (k, struct.pack("<d", v), int(t), now, _row_check(k, float(v), int(t)))
            for k, v, t in items
        ]
        try:
            with self._lock, db:
                before = db.total_changes
                db.executemany("INSERT OR IGNORE INTO logps VALUES (?, ?, ?, ?, ?)", rows)
                self.entries += db.total_changes - before
                self._evict(db)
        except sqlite3.Error as exc:
            self._write_error(exc)
        self._report_size()

    def _evict(self, db: sqlite3.Connection) -> None:
        if self.entries <= self.max_entries:
            return
        excess = self.entries - int(self.max_entries * _LOW_WATER)
        db.execute(
            "DELETE FROM logps WHERE key IN (SELECT key FROM logps ORDER BY last_used ASC LIMIT ?)",
            (excess,),
        )
        removed = db.execute("SELECT changes()").fetchone()[0]
        self.entries -= int(removed)
        self.events.on_evicted(int(removed))

    def _write_error(self, exc: BaseException) -> None:
        self.events.on_error("write")
        if not self._write_failed:
            self._write_failed = True
            log.error("reference cache %s: write failed (%s); requests go on", self.path, exc)
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):  # a rolled-back write: recount
                self.entries = int(self._db.execute("SELECT COUNT(*) FROM logps").fetchone()[0])

    # ----------------------------------------------------------------- size
    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += self.path.with_name(self.path.name + suffix).stat().st_size
        return total

    def _report_size(self) -> None:
        self.events.on_size(self.entries if self.enabled else 0, self.size_bytes())

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
