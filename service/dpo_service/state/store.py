"""The checkpoint store: atomic saves, verified loads, keep-K pruning, the directory lock.

A checkpoint is written into ``.tmp-ckpt-*``, every file and the directory are fsynced, the
directory is renamed to ``ckpt-<version>``, the parent is fsynced, and only then ``LATEST`` is
replaced (write, fsync, rename, fsync). A loader verifies every checksum and skips a truncated
or corrupted checkpoint for the previous good one. The format is in
:mod:`dpo_service.state.format`; this module only (de)serialises what it is given (the engine
reads and writes the model).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpo_service.state.files import (
    checkpoint_name,
    fsync_dir,
    fsync_file,
    join_optimizer_state,
    sha256_file,
    split_optimizer_state,
    unshared_tensors,
    weights_digest,
    write_json,
)
from dpo_service.state.format import (
    FORMAT,
    IDEMPOTENCY_FILE,
    LATEST_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    NAME_PATTERN,
    OPTIM_META_FILE,
    OPTIM_TENSORS_FILE,
    REQUIRED_FILES,
    STATE_FILE,
    TMP_PREFIX,
    WEIGHTS_FILE,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointInfo,
    Snapshot,
    check_compatible,
    json_file,
    manifest_digest,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the store
class CheckpointStore:
    """One checkpoint directory: atomic saves, verified loads, keep-K pruning."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)
        self._lock: TextIO | None = None
        self._resumed: int | None = None  # version this process resumed from
        self._written: set[int] = set()  # versions this process wrote

    # ------------------------------------------------------------- single writer
    def lock(self) -> None:
        """Take an exclusive lock so two servers never write the same directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fh = open(self.root / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise CheckpointError(
                f"checkpoint directory {self.root} is in use by another server process"
            ) from None
        self._lock = fh

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    # ------------------------------------------------------------- listing
    def versions(self) -> list[int]:
        """Versions of the ``ckpt-*`` directories present, ascending (valid or not)."""
        if not self.root.is_dir():
            return []
        found = (NAME_PATTERN.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_name(self) -> str | None:
        """The directory name ``LATEST`` holds, or None (absent or malformed)."""
        path = self.root / LATEST_FILE
        try:
            name = path.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not NAME_PATTERN.match(name):
            log.warning(
                "checkpoint pointer %s holds %r, not a checkpoint name; ignored", path, name
            )
            return None
        return name

    def describe(self) -> dict[str, Any]:
        """Every checkpoint with its verification result (for the admin endpoint)."""
        items = []
        for version in reversed(self.versions()):
            path = self.root / checkpoint_name(version)
            try:
                info = self.verify(path)
                items.append({**info.as_dict(), "valid": True})
            except CheckpointError as exc:
                items.append(
                    {"version": version, "path": str(path), "valid": False, "reason": str(exc)}
                )
        return {"directory": str(self.root), "latest": self.latest_name(), "checkpoints": items}

    # ------------------------------------------------------------- save
    def save(self, snap: Snapshot) -> CheckpointInfo:
        """Write ``snap`` atomically as ``ckpt-<version>``, point LATEST at it, prune."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temp_dirs()
        tmp = self.root / f"{TMP_PREFIX}{snap.version:012d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            info = self._write_files(tmp, snap)
            final = self.root / checkpoint_name(snap.version)
            if final.exists():  # an uncommitted leftover, or an older write of this version
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._written.add(snap.version)
        self._point_latest(final.name)
        self._prune(snap.version)
        return CheckpointInfo(
            snap.version, final, info.files, info.weights_sha256, info.created_unix
        )

    def _write_files(self, tmp: Path, snap: Snapshot) -> CheckpointInfo:
        weights = unshared_tensors(snap.weights)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        opt_tensors, opt_meta = split_optimizer_state(snap.optimizer)
        save_file(opt_tensors, str(tmp / OPTIM_TENSORS_FILE), metadata={"format": "pt"})
        for name in (WEIGHTS_FILE, OPTIM_TENSORS_FILE):
            fsync_file(tmp / name)
        write_json(tmp / OPTIM_META_FILE, opt_meta)
        created = time.time()
        write_json(
            tmp / STATE_FILE,
            {
                "version": snap.version,
                "model_config": snap.model_config,
                "tokenizer": snap.tokenizer,
                "extra": snap.extra,
                "created_unix": created,
            },
        )
        write_json(tmp / IDEMPOTENCY_FILE, [[rid, body] for rid, body in snap.idempotency])
        files: dict[str, dict[str, Any]] = {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in REQUIRED_FILES
        }
        digest = weights_digest(weights)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": snap.version,
            "created_unix": created,
            "weights_sha256": digest,
            "files": files,
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json(tmp / MANIFEST_FILE, manifest)
        fsync_dir(tmp)
        return CheckpointInfo(
            snap.version, tmp, {k: v["sha256"] for k, v in files.items()}, digest, created
        )

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST_FILE}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / LATEST_FILE)
        fsync_dir(self.root)

    def _prune(self, current: int) -> None:
        """Keep the ``keep`` newest checkpoints; first drop those of an abandoned history:
        newer than the one this process resumed from and not written by it."""
        floor = -1 if self._resumed is None else self._resumed
        versions = self.versions()
        abandoned = [v for v in versions if v > floor and v not in self._written]
        kept = [v for v in versions if v not in abandoned]
        doomed = abandoned + kept[: -self.keep]
        for version in doomed:
            path = self.root / checkpoint_name(version)
            try:
                shutil.rmtree(path)
            except OSError as exc:
                log.warning("could not remove old checkpoint %s: %s", path, exc)

    def _remove_temp_dirs(self) -> None:
        for p in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------- load
    def verify(self, path: Path) -> CheckpointInfo:
        """Check the manifest and every file's size and sha256; raise CheckpointCorrupt."""
        m = NAME_PATTERN.match(path.name)
        if m is None or not path.is_dir():
            raise CheckpointCorrupt(f"{path} is not a checkpoint directory")
        manifest = json_file(path / MANIFEST_FILE)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointCorrupt(f"{MANIFEST_FILE}: not a {FORMAT} manifest")
        if manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise CheckpointCorrupt(f"{MANIFEST_FILE}: checksum mismatch (edited or corrupted)")
        if manifest.get("version") != int(m.group(1)):
            raise CheckpointCorrupt(
                f"{MANIFEST_FILE}: version {manifest.get('version')} != directory name"
            )
        files = manifest.get("files") or {}
        for name in REQUIRED_FILES:
            entry = files.get(name)
            if not isinstance(entry, dict):
                raise CheckpointCorrupt(f"{MANIFEST_FILE} does not list {name}")
            fpath = path / name
            if not fpath.is_file():
                raise CheckpointCorrupt(f"{name}: missing")
            size = fpath.stat().st_size
            if size != entry.get("bytes"):
                raise CheckpointCorrupt(
                    f"{name}: {size} bytes, manifest says {entry.get('bytes')} (truncated?)"
                )
            if sha256_file(fpath) != entry.get("sha256"):
                raise CheckpointCorrupt(f"{name}: sha256 mismatch (corrupted)")
        return CheckpointInfo(
            int(manifest["version"]),
            path,
            {k: v["sha256"] for k, v in files.items()},
            str(manifest.get("weights_sha256", "")),
            float(manifest.get("created_unix", 0.0)),
        )

    def read(
        self, path: Path, optimizer_template: list[dict[str, Any]] | None = None
    ) -> tuple[Snapshot, CheckpointInfo]:
        """Verify ``path`` and load it (safetensors + JSON only). ``optimizer_template``: the
        live optimizer's param groups (see :func:`join_optimizer_state`)."""
        info = self.verify(path)
        try:
            weights = load_file(str(path / WEIGHTS_FILE), device="cpu")
            opt_tensors = load_file(str(path / OPTIM_TENSORS_FILE), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointCorrupt(f"unreadable safetensors: {exc}") from exc
        state = json_file(path / STATE_FILE)
        opt_meta = json_file(path / OPTIM_META_FILE)
        record = json_file(path / IDEMPOTENCY_FILE)
        try:
            snap = Snapshot(
                version=int(state["version"]),
                weights=weights,
                optimizer=join_optimizer_state(opt_tensors, opt_meta, optimizer_template),
                model_config=dict(state["model_config"]),
                tokenizer=dict(state["tokenizer"]),
                idempotency=[(str(rid), dict(body)) for rid, body in record],
                extra=dict(state.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointCorrupt(f"{STATE_FILE}/{OPTIM_META_FILE}: malformed ({exc})") from exc
        if snap.version != info.version:
            raise CheckpointCorrupt(f"{STATE_FILE}: version {snap.version} != {info.version}")
        return snap, info

    def load_latest(
        self,
        *,
        model_config: Mapping[str, Any],
        tokenizer: Mapping[str, Any],
        optimizer_template: list[dict[str, Any]] | None = None,
    ) -> tuple[Snapshot, CheckpointInfo] | None:
        """The newest valid checkpoint (LATEST first, then newest to oldest), or None.

        Corrupt ones are logged and skipped. One written for another model or tokenizer
        raises :class:`CheckpointMismatch`.
        """
        order = [checkpoint_name(v) for v in reversed(self.versions())]
        latest = self.latest_name()
        if latest is not None:
            if latest in order:
                order.remove(latest)
                order.insert(0, latest)
            else:
                log.warning(
                    "checkpoint pointer %s names %s, which does not exist; falling back",
                    self.root / LATEST_FILE,
                    latest,
                )
        for name in order:
            path = self.root / name
            try:
                snap, info = self.read(path, optimizer_template)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s; trying the previous one", path, exc)
                continue
            check_compatible(path, snap, model_config, tokenizer)
            self._resumed = snap.version
            return snap, info
        if order:
            log.warning("no valid checkpoint in %s; starting from the initial weights", self.root)
        return None
