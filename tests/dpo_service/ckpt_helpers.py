"""Test helpers for checkpoint files: rewrite a checkpoint as an older format, damage files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_service.state.files import sha256_file
from dpo_service.state.format import (
    FORMAT_V1,
    IDEMPOTENCY_FILE,
    MANIFEST_FILE,
    RECORD_FILE,
    manifest_digest,
)


def as_format_1(path: Path, entries: list[tuple[str, Any]]) -> None:
    """Turn the (format 2) checkpoint ``path`` into what format 1 wrote: the idempotency
    record ``entries`` in the checkpoint's own ``idempotency.json``, listed in a format-1
    manifest; the SQLite record next to it is removed (format 1 had none)."""
    record = path / IDEMPOTENCY_FILE
    record.write_text(json.dumps([[rid, body] for rid, body in entries], sort_keys=True))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["format"] = FORMAT_V1
    manifest["files"][IDEMPOTENCY_FILE] = {
        "sha256": sha256_file(record),
        "bytes": record.stat().st_size,
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, sort_keys=True))
    for extra in path.parent.glob(f"{RECORD_FILE}*"):
        extra.unlink()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
