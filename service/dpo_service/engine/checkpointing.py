"""The engine's checkpointing: TrainState ↔ checkpoint snapshots, resume on load, saves.

Everything here runs on the engine's worker thread (it reads and writes the model), called
only by :class:`dpo_service.engine.engine.Engine`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dpo_service.engine.events import EngineEvents
from dpo_service.engine.results import LossResult
from dpo_service.engine.train_state import IdempotencyMemory, Remembered, TrainState
from dpo_service.state.files import model_config_of, tokenizer_identity, weights_digest
from dpo_service.state.format import CheckpointInfo, Snapshot
from dpo_service.state.store import CheckpointStore

log = logging.getLogger(__name__)

# Train responses a checkpoint remembers for idempotent retries across restarts.
PERSISTED_REQUEST_IDS = 1024


def snapshot_state(state: TrainState) -> Snapshot:
    """What a checkpoint of ``state`` holds (tensors are the live ones: save before the next
    step touches them, i.e. on the worker thread)."""
    bundle = state.bundle
    recent = state.completed.recent(PERSISTED_REQUEST_IDS)
    return Snapshot(
        version=state.version,
        weights=bundle.model.state_dict(),
        optimizer=state.optimizer.state_dict(),
        model_config=model_config_of(bundle.model),
        tokenizer=tokenizer_identity(bundle.tokenizer),
        idempotency=[(rid, _entry_json(entry)) for rid, entry in recent],
        extra={
            "last_train_loss": state.last_train_loss,
            "dtype": str(next(bundle.model.parameters()).dtype),
            "model_name": bundle.name,
        },
    )


def restore_state(state: TrainState, snap: Snapshot, info: CheckpointInfo) -> None:
    """Load a verified checkpoint into ``state``: weights, optimizer state (the current
    settings' lr / betas / weight decay win), version and the idempotency record. The frozen
    reference copy, if any, stays the initial weights."""
    model = state.bundle.model
    dtype = str(next(model.parameters()).dtype)
    if snap.extra.get("dtype") not in (None, dtype):
        log.warning(
            "checkpoint %s holds %s weights; casting to the loaded model's %s",
            info.path,
            snap.extra.get("dtype"),
            dtype,
        )
    model.load_state_dict(snap.weights, strict=True)
    live_groups = [dict(g) for g in state.optimizer.param_groups]
    state.optimizer.load_state_dict(snap.optimizer)
    for group, live in zip(state.optimizer.param_groups, live_groups, strict=True):
        for key in ("lr", "betas", "weight_decay"):
            if key in live:
                group[key] = live[key]
    state.version = snap.version
    state.completed = restore_idempotency(snap.idempotency, str(info.path))
    loss = snap.extra.get("last_train_loss")
    state.last_train_loss = None if loss is None else float(loss)
    log.info("resumed from checkpoint %s (model version %d)", info.path, snap.version)


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


class Checkpointer:
    """One server's checkpoint directory: holds its lock, resumes, saves, lists."""

    def __init__(self, store: CheckpointStore, events: EngineEvents) -> None:
        self.store = store
        self.events = events
        self.last: CheckpointInfo | None = None

    @classmethod
    def open(
        cls, directory: Path, keep: int, state: TrainState, events: EngineEvents
    ) -> Checkpointer:
        """Lock ``directory`` and resume ``state`` from its latest valid checkpoint, if any.
        Raises :class:`~dpo_service.state.format.CheckpointError` (another process holds the
        directory, or the checkpoint is of another model)."""
        store = CheckpointStore(directory, keep=keep)
        store.lock()
        self = cls(store, events)
        try:
            found = store.load_latest(
                model_config=model_config_of(state.bundle.model),
                tokenizer=tokenizer_identity(state.bundle.tokenizer),
                optimizer_template=state.optimizer.state_dict()["param_groups"],
            )
        except BaseException:
            store.close()
            raise
        if found is not None:
            restore_state(state, *found)
            self.last = found[1]
            events.checkpoint_version.set(found[1].version)
        return self

    def save(self, state: TrainState) -> CheckpointInfo:
        """Checkpoint ``state`` (a no-op when this version is already on disk)."""
        last = self.last
        if last is not None and last.version == state.version and last.path.is_dir():
            return last
        started = time.monotonic()
        try:
            info = self.store.save(snapshot_state(state))
        except Exception:
            self.events.on_checkpoint_failed()
            raise
        self.last = info
        self.events.on_checkpoint(info.version, time.monotonic() - started)
        log.info("checkpoint: version %d at %s", info.version, info.path)
        return info

    @staticmethod
    def live(state: TrainState) -> dict[str, Any]:
        """The live model's version and weights digest (compare with a checkpoint's)."""
        weights = state.bundle.model.state_dict()
        return {"version": state.version, "weights_sha256": weights_digest(weights)}

    def close(self) -> None:
        self.store.close()
