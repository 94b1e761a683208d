"""A session's work on the engine's worker thread: loss-only batches, train steps,
gradient accumulation and the step over what was accumulated (issue 12).

A plain train request on a session is the default model's step (:func:`run_train_step`) on the
session's :class:`TrainState`, whose model is the adapter view and whose trainable tensors are
the adapter's. ``accumulate`` runs the same forward/backward but, instead of stepping, adds
``n ·`` (the request's mean-loss gradient) to the session's buffer; ``step`` divides the buffer
by the total pairs, so k accumulated requests of n pairs apply the update of one request of
k·n pairs (each loss is a mean of per-pair terms)."""

from __future__ import annotations

import dataclasses
import math
import uuid

import torch

from dpo_service.engine.distributed import wire
from dpo_service.engine.distributed.world import agree, current
from dpo_service.engine.loss_batch import batch_losses
from dpo_service.engine.losses import merge_parts
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.results import LossResult, result_from
from dpo_service.engine.sessions.session import Session, StepOutcome
from dpo_service.engine.train_step import (
    NonFiniteStepError,
    accumulate_gradients,
    apply_update,
    check_expected_version,
    check_not_halted,
    clip_and_check,
    replayed,
    run_train_step,
)
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.settings import Settings


def session_losses(
    session: Session, requests: list[PreparedRequest], settings: Settings
) -> list[LossResult | BaseException]:
    """Loss-only requests of one session in one inference pass (the default model's
    :func:`~dpo_service.engine.loss_batch.batch_losses` on the adapter view); the session's
    reference is its base with the adapter off."""
    state = session.state
    return batch_losses(
        session.view, state.reference, requests, settings, state.bundle, session.version
    )


def session_train(session: Session, request: PreparedRequest, settings: Settings) -> LossResult:
    """A train request of ``session``: one optimizer step, or an accumulation."""
    if request.accumulate:
        return accumulate(session, request, settings)
    if session.accumulated.pairs:
        raise ServiceError(
            ErrorCode.CONFLICT,
            f"session {session.id} holds the gradient of {session.accumulated.requests} "
            "accumulated request(s): call step first (or accumulate this one too)",
        )
    result = run_train_step(session.state, request, settings)
    if result.trained and result.new_model_version == session.version:
        session.touch()
    return result


def accumulate(session: Session, request: PreparedRequest, settings: Settings) -> LossResult:
    """Add ``request``'s gradient to the session's buffer; the version does not move.
    Idempotent by ``request_id`` (a retry answers the first result and adds nothing)."""
    state = session.state
    remembered = replayed(state, request)
    if remembered is not None:
        return remembered
    check_expected_version(state, request)
    check_not_halted(state)
    n = request.num_pairs
    state.optimizer.zero_grad(set_to_none=True)
    session.view.train()
    try:
        parts = accumulate_gradients(state, request, settings)
        clip_and_check(state, parts, n, math.inf)  # no clipping: only the finiteness checks
        add_to_buffer(session, n)
    finally:
        state.optimizer.zero_grad(set_to_none=True)
        session.view.eval()
    inputs, out = merge_parts(parts, n)
    request_id = request.request_id or uuid.uuid4().hex
    result = result_from(request, inputs, out, state.version, request_id)
    buffer = session.accumulated
    buffer.loss_sum += result.loss * n
    result = dataclasses.replace(
        result, extra={"accumulated": True, "accumulated_pairs": buffer.pairs}
    )
    if request.request_id is not None:
        state.completed.remember(request.request_id, result, request.digest)
    session.touch()
    return result


def add_to_buffer(session: Session, n: int) -> None:
    """Add the adapter's gradient of an ``n``-pair request (its mean loss) to the session's
    buffer, as ``n ·`` that gradient: the sum of the per-pair terms' gradients."""
    buffer = session.accumulated
    for name, p in session.params.items():
        if p.grad is None:
            continue
        grad = p.grad.detach() * n
        if name in buffer.grads:
            buffer.grads[name].add_(grad)
        else:
            buffer.grads[name] = grad.clone()
    buffer.pairs += n
    buffer.requests += 1


def step_accumulated(session: Session) -> float:
    """The optimizer step over the buffer (every rank runs it; it clears the buffer, also
    when the step is refused). Returns the gradient norm before clipping."""
    buffer, state = session.accumulated, session.state
    params = session.params
    try:
        for name, p in params.items():
            grad = buffer.grads.get(name)
            p.grad = None if grad is None else grad / buffer.pairs
        clip = session.config.optimizer.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), clip))
        if not agree(math.isfinite(grad_norm)):
            raise NonFiniteStepError(
                ErrorCode.INVALID_ARGUMENT,
                f"non-finite accumulated gradient norm ({grad_norm}); step not applied, "
                "the accumulated gradient is dropped",
            )
        apply_update(state)
    except NonFiniteStepError:
        buffer.clear()
        raise
    finally:
        state.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def session_step(session: Session, request_id: str | None) -> StepOutcome:
    """One optimizer step over everything accumulated since the last step."""
    if request_id is not None and request_id in session.steps:
        return dataclasses.replace(session.steps[request_id], replayed=True)
    buffer, state = session.accumulated, session.state
    if buffer.pairs == 0:
        raise ServiceError(
            ErrorCode.CONFLICT,
            f"session {session.id} has nothing accumulated: send train requests with "
            "accumulate=true first",
        )
    check_not_halted(state)
    world = current()
    if world is not None:  # every rank steps its copy of the adapter (issue 13)
        wire.send(world, wire.Command(wire.Op.SESSION_STEP, text=session.id))
    loss = buffer.loss_sum / buffer.pairs
    pairs, requests = buffer.pairs, buffer.requests
    grad_norm = step_accumulated(session)
    state.version += 1
    state.last_train_loss = loss
    outcome = StepOutcome(
        session=session.id,
        new_model_version=state.version,
        pairs=pairs,
        requests=requests,
        grad_norm=grad_norm,
        loss=loss,
        request_id=request_id,
    )
    buffer.clear()
    if request_id is not None:
        session.remember_step(request_id, outcome)
    session.touch()
    return outcome
