"""The SQLite reference log-prob cache on its own (state/reference_cache.py): keys, bit-exact
values, bounds and eviction, and every way the file can be bad (issue 14, item 4)."""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
from pathlib import Path

import pytest
import torch

from dpo_service.engine.reference_lookup import weights_digest
from dpo_service.settings import Settings
from dpo_service.state.reference_cache import (
    SCHEMA_VERSION,
    CacheEvents,
    ReferenceCache,
    reference_identity,
    sequence_key,
)

IDENT = reference_identity("ab" * 32, kind="frozen", compute_dtype="float32", device_type="cpu")


class Counting(CacheEvents):
    def __init__(self) -> None:
        self.hits = self.misses = self.evicted = 0
        self.errors: list[str] = []
        self.size = (0, 0)

    def on_hits(self, n: int) -> None:
        self.hits += n

    def on_misses(self, n: int) -> None:
        self.misses += n

    def on_error(self, what: str) -> None:
        self.errors.append(what)

    def on_evicted(self, n: int) -> None:
        self.evicted += n

    def on_size(self, entries: int, size_bytes: int) -> None:
        self.size = (entries, size_bytes)


def key(i: int) -> bytes:
    return sequence_key(IDENT, "tok", [1, 2, i], [i, 7])


def open_cache(
    path: Path, max_entries: int = 1000, **kw: object
) -> tuple[ReferenceCache, Counting]:
    events = Counting()
    return ReferenceCache(path, max_entries=max_entries, events=events, **kw), events  # type: ignore[arg-type]


def test_values_round_trip_bit_for_bit_and_persist(tmp_path: Path) -> None:
    """float32 sums (what the model gives) come back with the same bits, after a reopen too."""
    values = torch.tensor([-1 / 3, -123.456789, -1e-30, -0.0, -3.4e38], dtype=torch.float32)
    path = tmp_path / "c.sqlite"
    cache, events = open_cache(path)
    cache.put_many([(key(i), float(v), i + 1) for i, v in enumerate(values.tolist())])
    cache.close()
    cache, events = open_cache(path)
    got = cache.get_many([key(i) for i in range(5)] + [key(99)])
    assert got[5] is None and events.hits == 5 and events.misses == 1
    back = torch.tensor([g.logp for g in got[:5] if g is not None], dtype=torch.float32)
    assert back.view(torch.int32).tolist() == values.view(torch.int32).tolist()
    assert [g.tokens for g in got[:5] if g is not None] == [1, 2, 3, 4, 5]
    assert events.size[0] == 5 and events.size[1] > 0


def test_the_key_covers_every_part_unambiguously() -> None:
    base = sequence_key(IDENT, "tok", [1, 2], [3])
    others = [
        sequence_key(IDENT, "tok", [1], [2, 3]),  # same concatenation, other split
        sequence_key(IDENT, "tok2", [1, 2], [3]),
        sequence_key(IDENT.replace("float32", "bfloat16"), "tok", [1, 2], [3]),
        sequence_key(IDENT.replace("frozen", "adapter-off"), "tok", [1, 2], [3]),
        sequence_key(IDENT, "tok", [1, 2], [4]),
    ]
    assert len(base) == 32 and len({base, *others}) == 6
    assert sequence_key(IDENT, "tok", [1, 2], [3]) == base


def test_identity_names_weights_dtype_device_and_kind() -> None:
    model = torch.nn.Linear(4, 4)
    digest = weights_digest(model)
    assert digest == weights_digest(model)
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert weights_digest(half) != digest  # the stored dtype changes the numbers
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert weights_digest(model) != digest
    a = reference_identity(digest, kind="frozen", compute_dtype="float32", device_type="cpu")
    b = reference_identity(digest, kind="frozen", compute_dtype="bfloat16", device_type="cpu")
    c = reference_identity(digest, kind="adapter-off", compute_dtype="float32", device_type="cpu")
    d = reference_identity(digest, kind="frozen", compute_dtype="float32", device_type="cuda")
    assert len({a, b, c, d}) == 4 and digest in a


def _assert_set_aside(path: Path, caplog: pytest.LogCaptureFixture, events: Counting) -> None:
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert events.errors == ["corrupt"]
    aside = path.parent.glob(path.name + ".bad-*")
    assert len([p for p in aside if p.name[-4:] not in ("-wal", "-shm")]) == 1


def _works(cache: ReferenceCache) -> None:
    assert cache.enabled
    cache.put_many([(key(1), -2.5, 3)])
    got = cache.get_many([key(1)])[0]
    assert got is not None and got.logp == -2.5


def test_random_bytes_at_the_path_are_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(os.urandom(8192))
    with caplog.at_level(logging.WARNING):
        cache, events = open_cache(path)
    _assert_set_aside(path, caplog, events)
    _works(cache)


def test_a_foreign_schema_version_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sqlite"
    cache, _ = open_cache(path)
    cache.put_many([(key(1), -1.0, 1)])
    cache.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 'dpo-reference-cache/999' WHERE name = 'schema'")
    with caplog.at_level(logging.WARNING):
        cache, events = open_cache(path)
    _assert_set_aside(path, caplog, events)
    assert cache.get_many([key(1)]) == [None]  # the old rows are not used
    _works(cache)
    assert SCHEMA_VERSION.endswith("/1")


def test_another_apps_sqlite_file_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE logps (x INTEGER)")
    with caplog.at_level(logging.WARNING):
        cache, events = open_cache(path)
    _assert_set_aside(path, caplog, events)
    _works(cache)


def test_a_truncated_database_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sqlite"
    cache, _ = open_cache(path)
    cache.put_many([(key(i), -float(i), i) for i in range(3000)])
    cache.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # pages referenced but missing
    with caplog.at_level(logging.WARNING):
        cache, events = open_cache(path)
    _assert_set_aside(path, caplog, events)
    _works(cache)


def test_an_unwritable_location_turns_the_cache_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The parent is a file (root-proof): no crash, every lookup a miss, writes are no-ops."""
    (tmp_path / "file").write_text("x")
    with caplog.at_level(logging.WARNING):
        cache, events = open_cache(tmp_path / "file" / "c.sqlite")
    assert not cache.enabled and events.errors == ["open"]
    assert any("off for this run" in r.getMessage() for r in caplog.records)
    cache.put_many([(key(1), -1.0, 1)])
    assert cache.get_many([key(1)]) == [None] and events.misses == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_directory_turns_the_cache_off(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        cache, events = open_cache(ro / "c.sqlite")
        assert not cache.enabled and events.errors == ["open"]
        assert cache.get_many([key(1)]) == [None]
    finally:
        ro.chmod(0o755)


def test_eviction_keeps_the_bound_and_the_recently_used(tmp_path: Path) -> None:
    clock = iter(range(1, 10**6))
    cache, events = open_cache(tmp_path / "c.sqlite", max_entries=50, clock=lambda: next(clock))
    cache.put_many([(key(i), -float(i), 1) for i in range(40)])
    assert cache.get_many([key(0), key(1)])[0] is not None  # touched: now the most recent
    for start in range(40, 200, 20):
        cache.put_many([(key(i), -float(i), 1) for i in range(start, start + 20)])
        assert cache.entries <= 50
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM logps").fetchone()[0] == cache.entries
    assert events.evicted == 200 - cache.entries
    kept = cache.get_many([key(0), key(1), key(2), key(199)])
    assert kept[0] is None and kept[1] is None  # touched early, but 160 newer rows since
    assert kept[2] is None and kept[3] is not None


def test_touched_rows_outlive_untouched_ones(tmp_path: Path) -> None:
    clock = iter(range(1, 10**6))
    cache, _ = open_cache(tmp_path / "c.sqlite", max_entries=20, clock=lambda: next(clock))
    for i in range(20):  # one write each: key(0) oldest, then key(1), ...
        cache.put_many([(key(i), -float(i), 1)])
    cache.get_many([key(0)])
    cache.put_many([(key(100), -1.0, 1)])  # 21 > 20: evicts down to 19 (95 %)
    assert cache.entries == 19
    got = cache.get_many([key(0), key(1), key(2), key(100)])
    assert got[0] is not None and got[1] is None and got[2] is None and got[3] is not None


def test_a_damaged_row_is_never_returned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.sqlite"
    cache, events = open_cache(path)
    cache.put_many([(key(1), -2.0, 3), (key(2), -4.0, 5)])
    with sqlite3.connect(path) as db:  # a flipped bit in the stored value
        flipped = struct.pack("<q", struct.unpack("<q", struct.pack("<d", -2.0))[0] ^ 1)
        db.execute("UPDATE logps SET logp = ? WHERE key = ?", (flipped, key(1)))
    with caplog.at_level(logging.WARNING):
        got = cache.get_many([key(1), key(2)])
    assert got[0] is None and got[1] is not None and got[1].logp == -4.0
    assert events.errors == ["damaged_row"] and cache.get_many([key(1)]) == [None]


def test_a_failed_write_is_logged_once_counted_and_harmless(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, events = open_cache(tmp_path / "c.sqlite")
    cache.put_many([(key(1), -1.0, 1)])
    assert cache._db is not None
    cache._db.execute("PRAGMA query_only = 1")  # every write now fails, as on a read-only disk
    with caplog.at_level(logging.ERROR):
        cache.put_many([(key(2), -2.0, 2)])
        cache.put_many([(key(3), -3.0, 3)])
        got = cache.get_many([key(1), key(2)])  # the hit's last_used update fails too
    assert events.errors == ["write", "write", "write"]
    assert sum("write failed" in r.getMessage() for r in caplog.records) == 1
    assert got[0] is not None and got[1] is None and cache.entries == 1


def test_a_read_error_mid_run_turns_the_cache_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, events = open_cache(tmp_path / "c.sqlite")
    cache.put_many([(key(1), -1.0, 1)])
    assert cache._db is not None
    cache._db.close()  # the next read raises sqlite3.ProgrammingError (an sqlite3.Error)
    with caplog.at_level(logging.ERROR):
        assert cache.get_many([key(1)]) == [None]
    assert events.errors == ["read"] and not cache.enabled
    assert cache.get_many([key(1)]) == [None]


def test_the_cache_location_setting(tmp_path: Path) -> None:
    assert Settings().reference_cache_path is None
    assert Settings(checkpoint_dir=tmp_path).reference_cache_path == (
        tmp_path / "reference_cache.sqlite"
    )
    assert Settings(checkpoint_dir=tmp_path, reference_cache="off").reference_cache_path is None
    other = tmp_path / "x.db"
    assert Settings(reference_cache=str(other)).reference_cache_path == other
