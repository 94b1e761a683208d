"""A session to and from its checkpoint record (issue 12;
:mod:`dpo_service.state.sessions_store` writes it). What is kept: config, key digest,
version, last loss, times, the idempotency memory (train/accumulate results and steps), the
adapter, its AdamW state and any accumulated gradient."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from dpo_service.engine.results import LossResult
from dpo_service.engine.sessions.session import Session, SessionConfig, StepOutcome
from dpo_service.state.files import join_optimizer_state, split_optimizer_state
from dpo_service.state.sessions_store import StoredSession

#: ``SessionRegistry.create``
Create = Callable[..., tuple[Session, str | None]]

#: Idempotency entries kept in a session's checkpoint (the newest).
KEPT_RESULTS = 256


def snapshot(session: Session) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The session's record and tensors (copied: the live ones may move on). Worker thread."""
    tensors = {f"adapter.{k}": p.detach().to("cpu", copy=True) for k, p in session.params.items()}
    opt_tensors, opt_meta = split_optimizer_state(session.state.optimizer.state_dict())
    tensors.update({f"optimizer.{k}": t.clone() for k, t in opt_tensors.items()})
    acc = session.accumulated
    tensors.update(
        {f"accumulated.{k}": g.detach().to("cpu", copy=True) for k, g in acc.grads.items()}
    )
    state = session.state
    record = {
        "id": session.id,
        "config": session.config.to_json(),
        "key_sha256": session.key_sha256,
        "version": state.version,
        "last_loss": state.last_train_loss,
        "created": session.created,
        "last_used": session.last_used,
        "optimizer": opt_meta,
        "accumulated": {"pairs": acc.pairs, "requests": acc.requests, "loss_sum": acc.loss_sum},
        "completed": [
            [rid, entry.result.to_json(), entry.digest]
            for rid, entry in state.completed.recent(KEPT_RESULTS)
        ],
        "steps": [dataclasses.asdict(o) for o in list(session.steps.values())[-KEPT_RESULTS:]],
    }
    return record, tensors


def restore(create: Create, stored: StoredSession) -> Session:
    """Recreate a session from its checkpoint (same id, key, adapter, optimizer, memory)."""
    record, tensors = stored.record, stored.tensors
    config = SessionConfig.from_json(record["config"])
    session, _ = create(
        config, session_id=record["id"], key_sha256=record["key_sha256"], force=True
    )
    with torch.no_grad():
        for name, p in session.params.items():
            p.copy_(tensors[f"adapter.{name}"])
    opt = {k[len("optimizer.") :]: t for k, t in tensors.items() if k.startswith("optimizer.")}
    optimizer = session.state.optimizer
    optimizer.load_state_dict(
        join_optimizer_state(opt, record["optimizer"], optimizer.param_groups)
    )
    device = next(iter(session.params.values())).device
    acc = record["accumulated"]
    session.accumulated.grads = {
        k[len("accumulated.") :]: t.to(device)
        for k, t in tensors.items()
        if k.startswith("accumulated.")
    }
    session.accumulated.pairs, session.accumulated.requests = acc["pairs"], acc["requests"]
    session.accumulated.loss_sum = acc["loss_sum"]
    state = session.state
    state.version, state.last_train_loss = int(record["version"]), record["last_loss"]
    session.created, session.last_used = record["created"], record["last_used"]
    for rid, result, digest in record["completed"]:
        state.completed.remember(rid, LossResult.from_json(result), digest)
    for step in record["steps"]:
        outcome = StepOutcome(**step)
        if outcome.request_id is not None:
            session.remember_step(outcome.request_id, outcome)
    session.last_checkpoint_version = state.version
    return session
