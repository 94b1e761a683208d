"""Split one engine batch between the default model and the sessions (worker thread)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from dpo_service.engine.results import LossResult
from dpo_service.engine.sessions.registry import SessionRegistry
from dpo_service.errors import ErrorCode, ServiceError

if TYPE_CHECKING:
    from dpo_service.engine.batcher import Job

log = logging.getLogger(__name__)
Outcome = LossResult | BaseException


def run_with_sessions(
    registry: SessionRegistry,
    batch: list[Job],
    run_default: Callable[[list[Job]], list[Outcome]],
) -> list[Outcome]:
    """The batch's default-model jobs through ``run_default``, its session jobs through the
    registry (one pass per session); results in the batch's order."""
    default = [j for j in batch if j.request.session is None]
    mine = [j for j in batch if j.request.session is not None]
    results: dict[int, Outcome] = {}
    if default:
        for j, r in zip(default, run_default(default), strict=True):
            results[id(j)] = r
    try:
        outs = registry.run([j.request for j in mine])
    except Exception as exc:
        log.exception("session batch failed")
        outs = [ServiceError(ErrorCode.INTERNAL, f"model error: {type(exc).__name__}")] * len(mine)
    for j, r in zip(mine, outs, strict=True):
        results[id(j)] = r
    return [results[id(j)] for j in batch]
