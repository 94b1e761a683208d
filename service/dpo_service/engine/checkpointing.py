"""The engine's checkpointing: TrainState ↔ checkpoint snapshots, the idempotency record,
resume on load, saves.

Everything here runs on the engine's worker thread (it reads and writes the model), called
only by :class:`dpo_service.engine.engine.Engine`.

- **Resume** (:meth:`Checkpointer.open`): lock the directory, prove it writable, take the
  newest checkpoint that verifies (:mod:`dpo_service.state.resume`: refusal when none does,
  fresh optimizer or fresh start only when the settings allow), restore it, then the
  idempotency record up to its version. Any failure releases the lock.
- **Save** (:meth:`Checkpointer.save`): first the record rows of the steps since the last
  save (one small transaction: the record is never rewritten whole), then the checkpoint.
  When this version was saved already, the directory on disk is verified and written again
  if it no longer verifies (issue 10, item 4).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from dpo_service.engine.distributed.parallel import checkpoint_state
from dpo_service.engine.events import EngineEvents
from dpo_service.engine.results import LossResult
from dpo_service.engine.train_state import (
    IDEMPOTENCY_CACHE_SIZE,
    IdempotencyMemory,
    Remembered,
    TrainState,
)
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings
from dpo_service.state.files import (
    checkpoint_name,
    model_config_of,
    tokenizer_identity,
    weights_digest,
)
from dpo_service.state.format import (
    FORMAT_V1,
    RECORD_FILE,
    CheckpointInfo,
    Snapshot,
    mismatch,
)
from dpo_service.state.record import IdempotencyRecord, Row
from dpo_service.state.store import CheckpointStore
from dpo_service.state.verify import inspect

log = logging.getLogger(__name__)

# Train responses the on-disk record keeps for idempotent retries across restarts (as many
# as the memory holds).
PERSISTED_REQUEST_IDS = IDEMPOTENCY_CACHE_SIZE


def model_identity(bundle: ModelBundle) -> dict[str, Any]:
    """What a checkpoint records as the model's architecture: the bundle's ``identity``
    (Hugging Face models: architecture, sizes, vocabulary, tensor shapes), else the model's
    config (the built-in model)."""
    if bundle.identity is not None:
        return dict(bundle.identity)
    return model_config_of(bundle.model)


def snapshot_state(state: TrainState) -> Snapshot:
    """What a checkpoint of ``state`` holds (tensors are the live ones: save before the next
    step touches them, i.e. on the worker thread). The idempotency record is not in it."""
    bundle = state.bundle
    weights, optimizer = checkpoint_state(state)  # gathered on rank 0 under FSDP2 (issue 13)
    return Snapshot(
        version=state.version,
        weights=weights,
        optimizer=optimizer,
        model_config=model_identity(bundle),
        tokenizer=tokenizer_identity(bundle.tokenizer),
        extra={
            "last_train_loss": state.last_train_loss,
            "dtype": str(next(bundle.model.parameters()).dtype),
            "model_name": bundle.name,
        },
    )


def _check_shapes(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointMismatch unless ``weights`` has exactly the model's tensor names and
    shapes (so ``load_state_dict`` cannot fail half-way)."""
    live = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [f"missing tensor {k}" for k in sorted(live.keys() - saved.keys())]
    problems += [f"unexpected tensor {k}" for k in sorted(saved.keys() - live.keys())]
    problems += [
        f"{k}: checkpoint shape {saved[k]} != loaded {live[k]}"
        for k in sorted(live.keys() & saved.keys())
        if saved[k] != live[k]
    ]
    if problems:
        shown = problems[:5] + ([f"... {len(problems) - 5} more"] if len(problems) > 5 else [])
        raise mismatch(path, shown)


def restore_state(state: TrainState, snap: Snapshot, info: CheckpointInfo) -> None:
    """Load a verified checkpoint into ``state``: weights, optimizer state (the current
    settings' lr / betas / weight decay win; a fresh optimizer when ``snap.optimizer`` is
    None), version and last loss. The frozen reference copy, if any, stays the initial
    weights; the idempotency record is restored by :meth:`Checkpointer.open`."""
    model = state.bundle.model
    dtype = str(next(model.parameters()).dtype)
    if snap.extra.get("dtype") not in (None, dtype):
        log.warning(
            "checkpoint %s holds %s weights; casting to the loaded model's %s",
            info.path,
            snap.extra.get("dtype"),
            dtype,
        )
    _check_shapes(model, snap.weights, info.path)
    model.load_state_dict(snap.weights, strict=True)
    if snap.optimizer is not None:
        live_groups = [dict(g) for g in state.optimizer.param_groups]
        state.optimizer.load_state_dict(snap.optimizer)
        for group, live in zip(state.optimizer.param_groups, live_groups, strict=True):
            for key in ("lr", "betas", "weight_decay"):
                if key in live:
                    group[key] = live[key]
    state.version = snap.version
    loss = snap.extra.get("last_train_loss")
    state.last_train_loss = None if loss is None else float(loss)
    fresh = " with a FRESH optimizer" if snap.optimizer is None else ""
    log.info("resumed from checkpoint %s (model version %d)%s", info.path, snap.version, fresh)


def _entry_json(entry: Remembered) -> dict[str, Any]:
    """A remembered step as persisted: the result's versioned JSON plus the request digest."""
    data = entry.result.to_json()
    if entry.digest is not None:
        data["request_digest"] = entry.digest
    return data


def restore_idempotency(entries: list[tuple[str, dict[str, Any]]], where: str) -> IdempotencyMemory:
    """The persisted idempotency record as memory. An entry this version cannot read (another
    result schema, or malformed) is skipped with a log line: its request id is then no longer
    deduplicated, which the log says; it never stops a resume."""
    memory = IdempotencyMemory()
    skipped = 0
    for rid, body in entries:
        try:
            digest = body.get("request_digest") if isinstance(body, dict) else None
            memory.remember(rid, LossResult.from_json(body), digest)
        except (ValueError, TypeError) as exc:
            skipped += 1
            log.warning("checkpoint %s: idempotency entry %r not restored: %s", where, rid, exc)
    if skipped:
        log.warning(
            "checkpoint %s: %d remembered train request ids were skipped; retries of those ids "
            "would apply a new step",
            where,
            skipped,
        )
    return memory


def _rows(entries: list[tuple[str, Remembered]], after: int) -> list[Row]:
    """Record rows of the remembered steps newer than version ``after``."""
    rows: list[Row] = []
    for rid, entry in entries:
        version = entry.result.new_model_version
        if version is not None and version > after:
            rows.append((rid, version, _entry_json(entry)))
    return rows


class Checkpointer:
    """One server's checkpoint directory: holds its lock and the idempotency record,
    resumes, saves, lists."""

    def __init__(
        self, store: CheckpointStore, record: IdempotencyRecord, events: EngineEvents
    ) -> None:
        self.store = store
        self.record = record
        self.events = events
        self.last: CheckpointInfo | None = None  # the newest checkpoint of the live state
        self.persisted = 0  # the record holds the remembered steps up to this version

    @classmethod
    def open(cls, settings: Settings, state: TrainState, events: EngineEvents) -> Checkpointer:
        """Lock ``DPO_CHECKPOINT_DIR``, check it is writable, resume ``state`` from its newest
        valid checkpoint (if any; ``DPO_ALLOW_FRESH_START`` / ``DPO_ALLOW_FRESH_OPTIMIZER``
        decide what damaged ones allow) and the idempotency record up to that version.
        Raises :class:`~dpo_service.state.format.CheckpointError` (directory in use or not
        writable, damaged checkpoints and no permission to start fresh, another model's
        checkpoint); whatever fails, the directory lock is released."""
        assert settings.checkpoint_dir is not None
        directory = Path(settings.checkpoint_dir)
        store = CheckpointStore(directory, keep=settings.checkpoint_keep)
        store.lock()
        record: IdempotencyRecord | None = None
        try:
            store.check_writable()
            record = IdempotencyRecord(directory / RECORD_FILE, PERSISTED_REQUEST_IDS)
            self = cls(store, record, events)
            found = store.load_latest(
                model_config=model_identity(state.bundle),
                tokenizer=tokenizer_identity(state.bundle.tokenizer),
                optimizer_template=state.optimizer.state_dict()["param_groups"],
                allow_fresh_optimizer=settings.allow_fresh_optimizer,
                allow_fresh_start=settings.allow_fresh_start,
            )
            if found is not None:
                restore_state(state, *found)
            self._resume_record(state, found[0] if found is not None else None)
        except BaseException:
            if record is not None:
                record.close()
            store.close()
            raise
        if found is not None:
            self.last = found[1] if found[0].optimizer is not None else None
            events.checkpoint_version.set(found[1].version)
        return self

    def _resume_record(self, state: TrainState, snap: Snapshot | None) -> None:
        """The record as of ``state.version``: a format-1 checkpoint's own record is
        imported; otherwise the rows of steps up to the resumed version (newer rows are
        those of steps the resumed state does not hold: ignored now, deleted by this
        process's first append)."""
        if snap is not None and snap.format == FORMAT_V1:
            where = str(self.store.root / checkpoint_name(snap.version))
            memory = restore_idempotency(snap.idempotency, where)
            self.record.replace_all(_rows(memory.recent(len(memory)), -1))
        else:
            rows = self.record.load(upto=state.version)
            memory = restore_idempotency(rows, str(self.record.path))
        state.completed = memory
        self.persisted = state.version

    def save(self, state: TrainState) -> CheckpointInfo:
        """Checkpoint ``state``: the record rows of the steps since the last save, then the
        checkpoint directory. When this version is already on disk and still verifies with
        the same weights, nothing is written; when it no longer verifies it is written again."""
        last = self.last
        if last is not None and last.version == state.version:
            problem = self.on_disk_problem(last)
            if problem is None:
                return last
            log.warning(
                "checkpoint %s no longer verifies (%s); writing it again", last.path, problem
            )
        started = time.monotonic()
        try:
            new = state.version - self.persisted
            if new > 0:
                rows = _rows(state.completed.recent(new), self.persisted)
                self.record.append(rows, after=self.persisted)
                self.persisted = state.version
            info = self.store.save(snapshot_state(state))
        except Exception:
            self.events.on_checkpoint_failed()
            raise
        self.last = info
        self.events.on_checkpoint(info.version, time.monotonic() - started)
        log.info("checkpoint: version %d at %s", info.version, info.path)
        return info

    @staticmethod
    def on_disk_problem(info: CheckpointInfo) -> str | None:
        """Why the checkpoint ``info`` describes is no longer on disk as written, or None."""
        check = inspect(info.path)
        if not check.valid or check.info is None:
            return check.reason
        if check.info.weights_sha256 != info.weights_sha256:
            return "its weights are not the ones this server wrote"
        return None

    @staticmethod
    def live(state: TrainState) -> dict[str, Any]:
        """The live model's version and weights digest (compare with a checkpoint's)."""
        weights, _ = checkpoint_state(state)
        return {"version": state.version, "weights_sha256": weights_digest(weights)}

    def close(self) -> None:
        self.record.close()
        self.store.close()
