"""Session checkpoints on disk (issue 12): one file per session,
``<DPO_CHECKPOINT_DIR>/sessions/<id>.safetensors``, holding the adapter, its AdamW state and any
accumulated gradient as tensors and the rest (config, key digest, version, idempotency
memory) as JSON in the safetensors metadata, with a digest of the tensors.

Writes are atomic: a temporary file in the same directory, fsync, rename over the old file,
fsync of the directory; a kill at any point leaves the previous file or the new one. A file
that does not parse or whose digest does not match is moved aside (``*.damaged``) at load and
reported, never half-loaded. Never pickle: safetensors and JSON only. This module knows
nothing about models or engines: it stores named tensors and a JSON record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpo_service.state.files import fsync_dir, fsync_file, unshared_tensors, weights_digest

log = logging.getLogger(__name__)
SCHEMA = "dpo-session/1"
_NAME = re.compile(r"^s-[0-9a-f]{16}$")


@dataclass
class StoredSession:
    """One session read back: its JSON record and tensors."""

    record: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class SessionStore:
    """The sessions directory (see the module docstring). Thread-safe: one lock per
    session id, so writing session A never waits on session B."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, sid: str) -> Path:
        if not _NAME.fullmatch(sid):
            raise ValueError(f"not a session id: {sid!r}")
        return self.root / f"{sid}.safetensors"

    def _lock(self, sid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sid, threading.Lock())

    def save(self, sid: str, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
        """Write session ``sid`` atomically; returns its path."""
        final = self.path(sid)
        tmp = self.root / f".{sid}.{os.getpid()}.{threading.get_ident()}.tmp"
        plain = unshared_tensors(tensors)
        meta = {
            "schema": SCHEMA,
            "record": json.dumps(record, sort_keys=True),
            "digest": weights_digest(plain),
        }
        with self._lock(sid):
            try:
                save_file(plain, str(tmp), metadata=meta)
                fsync_file(tmp)
                os.replace(tmp, final)
                fsync_dir(self.root)
            finally:
                tmp.unlink(missing_ok=True)
        return final

    def delete(self, sid: str) -> None:
        with self._lock(sid):
            self.path(sid).unlink(missing_ok=True)
            fsync_dir(self.root)

    def load_all(self) -> list[StoredSession]:
        """Every session that reads back intact, oldest file first; damaged files are moved
        aside to ``<name>.damaged`` with an error in the log."""
        out = []
        files = sorted(self.root.glob("s-*.safetensors"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                out.append(self._read(path))
            except Exception as exc:
                aside = path.with_suffix(".damaged")
                log.error("session checkpoint %s is damaged (%s); moved to %s", path, exc, aside)
                os.replace(path, aside)
        return out

    @staticmethod
    def _read(path: Path) -> StoredSession:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("schema") != SCHEMA:
            raise ValueError(f"schema {meta.get('schema')!r}, expected {SCHEMA!r}")
        tensors = load_file(str(path))
        if weights_digest(tensors) != meta.get("digest"):
            raise ValueError("the tensors do not match their digest")
        record = json.loads(meta["record"])
        if not isinstance(record, dict):
            raise ValueError("the record is not a JSON object")
        return StoredSession(record=record, tensors=tensors)
