"""Which checkpoint start-up resumes (issue 10, item 2: a resume must never destroy training).

Newest first, by version (``LATEST`` is only logged when it disagrees: a committed, verified
directory is the truth):

1. the first checkpoint that verifies completely is resumed;
2. one whose weights part verifies but whose optimizer files do not is resumed with a fresh
   optimizer when ``allow_fresh_optimizer`` (else it is skipped, kept, and named in the log);
3. a damaged one is skipped (and kept on disk) for the previous one;
4. when checkpoints exist (or ``LATEST`` names one) and none can be resumed, start-up is
   refused with :class:`CheckpointCorrupt` naming each and why, unless ``allow_fresh_start``
   (then the initial weights, and the damaged checkpoints stay where they are).

The first checkpoint taken is checked against the loaded model and tokenizer
(:class:`CheckpointMismatch`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_service.state.files import checkpoint_name
from dpo_service.state.format import (
    CheckpointCorrupt,
    CheckpointInfo,
    Snapshot,
    check_compatible,
)
from dpo_service.state.verify import inspect, read_optimizer_part, read_weights_part

log = logging.getLogger(__name__)

FRESH_OPTIMIZER_HINT = "its weights verify: DPO_ALLOW_FRESH_OPTIMIZER=true resumes them"


@dataclass(frozen=True)
class Resume:
    snapshot: Snapshot  # optimizer None: weights only, a fresh optimizer
    info: CheckpointInfo


def _try(
    path: Path, template: list[dict[str, Any]] | None, fresh_optimizer: bool
) -> tuple[Resume | None, str]:
    """Resume ``path`` if it can be; else (None, why not)."""
    check = inspect(path)
    if not check.weights_valid or check.info is None:
        return None, check.reason
    try:
        snap = read_weights_part(check)
    except CheckpointCorrupt as exc:
        return None, str(exc)
    problem = check.reason if check.problems else None
    if problem is None:
        try:
            snap.optimizer = read_optimizer_part(path, template)
            return Resume(snap, check.info), "valid"
        except CheckpointCorrupt as exc:
            problem = str(exc)
    if not fresh_optimizer:
        return None, f"{problem} ({FRESH_OPTIMIZER_HINT} with a fresh optimizer)"
    log.warning(
        "checkpoint %s: %s; resuming its weights with a FRESH optimizer "
        "(DPO_ALLOW_FRESH_OPTIMIZER=true)",
        path,
        problem,
    )
    return Resume(snap, check.info), "weights only"


def _refusal(root: Path, failures: list[tuple[str, str]], latest: str | None) -> str:
    named = "; ".join(f"{name}: {why}" for name, why in failures)
    if not failures:
        named = f"{latest} (named by LATEST): missing"
    return (
        f"no checkpoint in {root} can be resumed, and starting from the initial weights would "
        f"discard the training they hold: {named}. Repair or restore them, or set "
        "DPO_ALLOW_FRESH_START=true to start from the initial weights anyway (the damaged "
        "checkpoints are kept, never pruned)."
    )


def choose_checkpoint(
    root: Path,
    versions: list[int],
    latest: str | None,
    *,
    model_config: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    optimizer_template: list[dict[str, Any]] | None = None,
    allow_fresh_optimizer: bool = False,
    allow_fresh_start: bool = False,
) -> Resume | None:
    """The checkpoint to resume (see the module docstring), or None to start fresh."""
    names = [checkpoint_name(v) for v in reversed(versions)]
    if latest is not None and latest not in names:
        log.warning("checkpoint pointer %s names %s, which does not exist", root, latest)
    failures: list[tuple[str, str]] = []
    for name in names:
        found, why = _try(root / name, optimizer_template, allow_fresh_optimizer)
        if found is None:
            log.warning("skipping checkpoint %s: %s; trying the previous one", root / name, why)
            failures.append((name, why))
            continue
        check_compatible(root / name, found.snapshot, model_config, tokenizer)
        if latest is not None and latest != name:
            log.warning("LATEST names %s; resuming %s, the newest that verifies", latest, name)
        return found
    if not names and latest is None:
        return None  # a new directory
    message = _refusal(root, failures, latest)
    if not allow_fresh_start:
        raise CheckpointCorrupt(message)
    log.warning("%s Starting from the initial weights (DPO_ALLOW_FRESH_START=true).", message)
    return None
