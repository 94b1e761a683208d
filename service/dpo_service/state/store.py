"""The checkpoint store: atomic saves, verified resume, keep-K pruning, the directory lock.

A checkpoint is written into ``.tmp-ckpt-*``, every file and the directory are fsynced, the
directory is renamed to ``ckpt-<version>`` (the commit point) and the parent fsynced; then
``LATEST`` is replaced (write, fsync, rename, fsync). Guarantees:

- **Resume** (:meth:`CheckpointStore.load_latest`) takes the newest checkpoint that verifies,
  whatever ``LATEST`` says, skipping (and logging) damaged ones. When checkpoints exist but
  none verifies it refuses (an error naming each and why) unless ``allow_fresh_start``; one
  whose weights verify but whose optimizer files do not is resumed with a fresh optimizer only
  with ``allow_fresh_optimizer``.
- **Nothing newer is destroyed**: a save never prunes a checkpoint newer than the version it
  writes, and a damaged directory in the way of a save (left by an earlier run) is moved aside
  as ``ckpt-<version>.damaged-<time>`` and kept. Only our own damaged copy of the very state
  being saved is replaced (moved aside, the new one renamed in, then removed).
- **Writable**: :meth:`CheckpointStore.check_writable` proves at start that files can be
  created, written, fsynced and removed.

The format is in :mod:`dpo_service.state.format`, verification in
:mod:`dpo_service.state.verify`; this module only (de)serialises what it is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from dpo_service.state.files import (
    checkpoint_name,
    fsync_dir,
    fsync_file,
    sha256_file,
    split_optimizer_state,
    unshared_tensors,
    weights_digest,
    write_durably,
    write_json,
)
from dpo_service.state.format import (
    ASIDE_PREFIX,
    DAMAGED_SUFFIX,
    FORMAT,
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
    CheckpointError,
    CheckpointInfo,
    Snapshot,
    manifest_digest,
)
from dpo_service.state.resume import Resume, choose_checkpoint
from dpo_service.state.verify import inspect, verify

log = logging.getLogger(__name__)


class CheckpointStore:
    """One checkpoint directory: atomic saves, verified loads, keep-K pruning."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)
        self._lock: int | None = None
        self._own: set[int] = set()  # versions whose directory holds this process's state

    # ------------------------------------------------------------- single writer
    def lock(self) -> None:
        """Take an exclusive lock so two servers never write the same directory. The lock
        file is opened read-only (a flock needs no write access)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"checkpoint directory {self.root} is unusable: {exc}") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except OSError:
            os.close(fd)
            raise CheckpointError(
                f"checkpoint directory {self.root} is in use by another server process"
            ) from None
        self._lock = fd

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def check_writable(self) -> None:
        """Create, write, fsync and remove a probe file; raise :class:`CheckpointError`
        when the directory cannot take a checkpoint (read-only, full, permissions)."""
        probe = self.root / f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            write_durably(probe, b"probe\n")
            probe.unlink()
            fsync_dir(self.root)
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
            raise CheckpointError(
                f"checkpoint directory {self.root} is not writable ({exc}); checkpoints "
                "could not be written, so the server does not start"
            ) from None

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
            check = inspect(self.root / checkpoint_name(version))
            if check.valid and check.info is not None:
                items.append({**check.info.as_dict(), "valid": True})
            else:
                items.append(
                    {
                        "version": version,
                        "path": str(check.path),
                        "valid": False,
                        "weights_valid": check.weights_valid,
                        "reason": check.reason,
                    }
                )
        return {"directory": str(self.root), "latest": self.latest_name(), "checkpoints": items}

    # ------------------------------------------------------------- load
    verify = staticmethod(verify)

    def load_latest(
        self,
        *,
        model_config: Mapping[str, Any],
        tokenizer: Mapping[str, Any],
        optimizer_template: list[dict[str, Any]] | None = None,
        allow_fresh_optimizer: bool = False,
        allow_fresh_start: bool = False,
    ) -> tuple[Snapshot, CheckpointInfo] | None:
        """The newest checkpoint that verifies (see :mod:`dpo_service.state.resume`), or None
        when there is none to resume. Raises :class:`CheckpointCorrupt` when checkpoints exist
        but none can be resumed (unless ``allow_fresh_start``) and
        :class:`CheckpointMismatch` when the one found is of another model or tokenizer."""
        found: Resume | None = choose_checkpoint(
            self.root,
            self.versions(),
            self.latest_name(),
            model_config=model_config,
            tokenizer=tokenizer,
            optimizer_template=optimizer_template,
            allow_fresh_optimizer=allow_fresh_optimizer,
            allow_fresh_start=allow_fresh_start,
        )
        if found is None:
            return None
        if found.snapshot.optimizer is not None:
            self._own.add(found.snapshot.version)  # the directory holds exactly this state
        return found.snapshot, found.info

    # ------------------------------------------------------------- save
    def save(self, snap: Snapshot) -> CheckpointInfo:
        """Write ``snap`` atomically as ``ckpt-<version>``, point LATEST at it, prune older
        ones beyond ``keep`` (never a newer one)."""
        if snap.idempotency or snap.optimizer is None:
            raise ValueError("a snapshot to save holds its optimizer state and no record")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temp_dirs()
        tmp = self.root / f"{TMP_PREFIX}{snap.version:012d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            info = self._write_files(tmp, snap)
            final = self._commit(tmp, snap.version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._own.add(snap.version)
        self._point_latest(final.name)
        self._prune(snap.version)
        return CheckpointInfo(
            snap.version, final, info.files, info.weights_sha256, info.created_unix
        )

    def _commit(self, tmp: Path, version: int) -> Path:
        """Rename ``tmp`` to ``ckpt-<version>``. A directory already there did not verify
        (callers keep a valid one): our own copy of this state is replaced; one left by an
        earlier run is moved aside as ``*.damaged-<time>`` and kept."""
        final = self.root / checkpoint_name(version)
        aside: Path | None = None
        if final.exists():
            if version in self._own:
                aside = self.root / f"{ASIDE_PREFIX}{version:012d}-{uuid.uuid4().hex[:8]}"
            else:
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                kept = self.root / f"{final.name}{DAMAGED_SUFFIX}{stamp}-{uuid.uuid4().hex[:4]}"
                log.warning(
                    "checkpoint %s is in the way of a new save (%s); kept as %s",
                    final,
                    inspect(final).reason,
                    kept.name,
                )
                os.rename(final, kept)
        if aside is not None:
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return final

    def _write_files(self, tmp: Path, snap: Snapshot) -> CheckpointInfo:
        assert snap.optimizer is not None
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
        try:
            write_durably(tmp, (name + "\n").encode())
            os.replace(tmp, self.root / LATEST_FILE)
            fsync_dir(self.root)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _prune(self, current: int) -> None:
        """Keep the ``keep`` newest checkpoints up to ``current``; never touch a newer one
        (it may be a damaged-but-recoverable checkpoint of a history this process did not
        resume)."""
        older = [v for v in self.versions() if v <= current]
        for version in older[: -self.keep]:
            path = self.root / checkpoint_name(version)
            try:
                shutil.rmtree(path)
            except OSError as exc:
                log.warning("could not remove old checkpoint %s: %s", path, exc)

    def _remove_temp_dirs(self) -> None:
        for prefix in (TMP_PREFIX, ASIDE_PREFIX):
            for p in self.root.glob(f"{prefix}*"):
                shutil.rmtree(p, ignore_errors=True)
