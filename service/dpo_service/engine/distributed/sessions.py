"""LoRA sessions under torchrun: every rank holds every session's adapter (issue 13).

Rank 0 creates, resumes and deletes sessions; each change is sent to the other ranks as
rank 0's snapshot of the session (the same record and tensors its checkpoint file holds,
:func:`~dpo_service.engine.sessions.persist.snapshot`), which they restore, so every rank's
adapter, AdamW state and accumulated gradient are rank 0's. The sessions' frozen base, when
it is not the frozen reference copy, is built on every rank and takes rank 0's weights.
Adapters are replicated: their gradients are averaged by one all-reduce per request
(:func:`~dpo_service.engine.distributed.parallel.reduce_gradients`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from dpo_service.engine.distributed import wire
from dpo_service.engine.distributed.parallel import broadcast_module
from dpo_service.engine.distributed.world import World
from dpo_service.engine.sessions.persist import restore, snapshot
from dpo_service.engine.sessions.registry import SessionRegistry
from dpo_service.engine.sessions.session import Session
from dpo_service.state.sessions_store import StoredSession


def view_key(sid: str) -> str:
    return f"view:{sid}"


def announce_sync(world: World, session: Session) -> None:
    """Rank 0: every rank (re)creates ``session`` from rank 0's snapshot of it."""
    world.register(view_key(session.id), session.view)
    record, tensors = snapshot(session)
    names = sorted(tensors)
    blob = json.dumps({**record, "tensor_names": names}).encode("utf-8")
    raw = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())
    wire.send(
        world,
        wire.Command(
            wire.Op.SESSION_SYNC, text=session.id, tensors=[raw, *(tensors[n] for n in names)]
        ),
    )


def announce_delete(world: World, sid: str) -> None:
    world.unregister(view_key(sid))
    wire.send(world, wire.Command(wire.Op.SESSION_DELETE, text=sid))


def announce_base(world: World, base: nn.Module) -> None:
    """Rank 0: the sessions' own base was just built; every rank builds it and takes rank
    0's weights."""
    wire.send(world, wire.Command(wire.Op.SESSION_BASE))
    broadcast_module(world, base)
    world.register("base", base)


def apply_sync(world: World, registry: SessionRegistry, command: wire.Command) -> None:
    """Ranks > 0: restore rank 0's snapshot of a session (replacing the one held, if any)."""
    record: dict[str, Any] = json.loads(command.tensors[0].numpy().tobytes().decode("utf-8"))
    names = record.pop("tensor_names")
    tensors = dict(zip(names, command.tensors[1:], strict=True))
    sid = command.text
    if sid in registry.sessions:
        apply_delete(world, registry, sid)
    session = restore(registry.create, StoredSession(record=record, tensors=tensors))
    world.register(view_key(sid), session.view)


def apply_delete(world: World, registry: SessionRegistry, sid: str) -> None:
    world.unregister(view_key(sid))
    if sid in registry.sessions:
        registry.delete(sid)


def apply_base(world: World, registry: SessionRegistry) -> None:
    base = registry.require_base()
    broadcast_module(world, base)
    if id(base) not in world.keys:
        world.register("base", base)
