"""One online training step, as named steps run in order on the engine's worker thread:

1. :func:`replayed`: a ``request_id`` seen before answers its first result, applies nothing;
2. :func:`check_expected_version`: a stale ``expected_version`` is a 409;
3. :func:`accumulate_gradients`: length-sorted micro-batches under ``max_batch_tokens``,
   each with its reference pass (when the frozen copy is used), loss and backward; every loss
   is a mean of per-pair terms, so the accumulated gradient is that of the whole batch;
4. :func:`clip_and_check`: gradient clipping (after unscaling, with float16 loss scaling),
   then nothing is applied when the loss, a statistic or the gradient norm is not finite
   (:class:`NonFiniteStepError`);
5. :func:`apply_update`: the optimizer step, guarded so that no acknowledged step leaves a
   non-finite weight or moment (:mod:`dpo_service.engine.step_guard`);
6. the version bump, and the result remembered under its ``request_id``.

Precision (:mod:`dpo_service.engine.precision`): the forward passes run under autocast in the
compute dtype, the loss and backward outside it on float32 log-probs; the parameters AdamW
updates are float32. With float16 compute the loss is scaled (``state.scaler``) before
backward and the gradients unscaled before clipping; a step whose gradients overflowed is not
applied and its message says so (the scale is halved for the next step).
"""

from __future__ import annotations

import math
import uuid

import torch

from dpo_service.engine.distributed import wire
from dpo_service.engine.distributed.parallel import clip_grad_norm
from dpo_service.engine.distributed.train import sharded_gradients, train_command
from dpo_service.engine.distributed.world import World, agree, current
from dpo_service.engine.forward import group_logps, micro_batches
from dpo_service.engine.losses import (
    Part,
    compute_loss,
    detached,
    merge_parts,
    preference_inputs,
)
from dpo_service.engine.precision import autocast
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.reference_lookup import reference_logps
from dpo_service.engine.results import LossResult, all_finite, result_from
from dpo_service.engine.step_guard import StepSnapshot, dry_run, updated_finite
from dpo_service.engine.train_state import TrainState
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.settings import Settings, StepRollback
from modern_llm.alignment.logprobs import PairTokens, SequenceLogps


class NonFiniteStepError(ServiceError):
    """A train step whose loss, rewards, gradients or update are not finite (nothing was
    applied; counted in ``dpo_rejected_steps_total``)."""


def check_not_halted(state: TrainState) -> None:
    """Training stopped after a post-step check failed with nothing to restore."""
    if state.halted is not None:
        raise ServiceError(
            ErrorCode.UNAVAILABLE,
            f"training is stopped: {state.halted}; restart the service (it resumes the last "
            "checkpoint)",
        )


def replayed(state: TrainState, request: PreparedRequest) -> LossResult | None:
    """The remembered result of a retried ``request_id``, else None. The same ``request_id``
    with a different request (another digest) is a CONFLICT (409 / ABORTED), never the first
    request's result; entries restored without a digest are replayed as before."""
    if request.request_id is None:
        return None
    entry = state.completed.entry(request.request_id)
    if entry is None:
        return None
    if entry.digest is not None and request.digest is not None and entry.digest != request.digest:
        raise ServiceError(
            ErrorCode.CONFLICT,
            f"request_id {request.request_id!r} was already used by a different train request "
            f"(its step made model version {entry.result.new_model_version}); a request_id "
            "is an idempotency key: send a new one for a new request",
        )
    return entry.result


def check_expected_version(state: TrainState, request: PreparedRequest) -> None:
    if request.expected_version is not None and request.expected_version != state.version:
        raise ServiceError(
            ErrorCode.CONFLICT,
            f"expected_version {request.expected_version} but the model is at version {state.version}",
        )


def _reference_logps(
    state: TrainState, pairs: list[PairTokens], settings: Settings
) -> SequenceLogps:
    """The frozen reference's log-probs of ``pairs``, as ordinary (not inference) tensors."""
    assert state.reference is not None
    with torch.inference_mode():
        ref = reference_logps(state.reference, pairs, settings, state.bundle)
    return SequenceLogps(
        ref.chosen.clone(), ref.rejected.clone(), ref.chosen_tokens, ref.rejected_tokens
    )


def accumulate_gradients(
    state: TrainState, request: PreparedRequest, settings: Settings
) -> list[Part]:
    """Forward, loss and backward of every micro-batch; returns the detached parts."""
    world = current()
    if world is not None:  # under torchrun: data-parallel over the ranks (issue 13)
        return _sharded_accumulate(world, state, request, settings)
    n = request.num_pairs
    parts: list[Part] = []
    for group in micro_batches(request.pairs, settings.max_batch_tokens):
        sub = [request.pairs[i] for i in group]
        ref = _reference_logps(state, sub, settings) if request.reference == "frozen" else None
        model = state.bundle.causal_lm
        with autocast(model.lm_head_weight.device, state.compute_dtype):
            logps = group_logps(
                model, sub, settings, state.bundle, tokens=request.return_token_logps
            )
        inputs = preference_inputs(request, logps, ref, group)  # float32 log-probs
        out = compute_loss(request, inputs, logps)
        state.scaler.scale(out.losses.sum() / n).backward()  # unscaled when not float16
        parts.append((group, detached(inputs), out))
    return parts


def _sharded_accumulate(
    world: World, state: TrainState, request: PreparedRequest, settings: Settings
) -> list[Part]:
    """Rank 0: the reference of the whole request first (a sharded pass, through the cache),
    then the train command and the sharded gradients, the loss on rank 0
    (:mod:`dpo_service.engine.distributed.train`)."""
    n = request.num_pairs
    ref = (
        _reference_logps(state, request.pairs, settings) if request.reference == "frozen" else None
    )
    wire.send(
        world,
        train_command(
            world,
            state,
            request.pairs,
            tokens=request.return_token_logps,
            accumulate=request.accumulate,
        ),
    )
    parts: list[Part] = []

    def loss_of(group: list[int], logps: SequenceLogps) -> torch.Tensor:
        mine = None if ref is None else _rows(ref, group)
        inputs = preference_inputs(request, logps, mine, group)  # float32 log-probs
        out = compute_loss(request, inputs, logps)
        parts.append((group, detached(inputs), out))
        return out.losses.sum() / n

    refused = sharded_gradients(
        world, state, request.pairs, settings, tokens=request.return_token_logps, loss_of=loss_of
    )
    if refused is not None:
        raise refused
    return parts


def _rows(logps: SequenceLogps, idx: list[int]) -> SequenceLogps:
    index = torch.tensor(idx, device=logps.chosen.device)
    return SequenceLogps(
        logps.chosen[index],
        logps.rejected[index],
        logps.chosen_tokens[index],
        logps.rejected_tokens[index],
    )


def clip_and_check(state: TrainState, parts: list[Part], n: int, max_norm: float) -> float:
    """Clip the accumulated (unscaled) gradient; returns its norm before clipping. Raises
    :class:`NonFiniteStepError` when the loss, a statistic or the norm is not finite."""
    grad_norm = clip_grad_norm(current(), state.trainable(), max_norm)  # global under FSDP2
    loss_value = sum(float(o.losses.detach().sum()) for _, _, o in parts) / n
    finite_out = all(all_finite(o) for _, _, o in parts)
    if state.scaler.is_enabled() and not math.isfinite(grad_norm) and math.isfinite(loss_value):
        scale = state.scaler.get_scale()
        raise NonFiniteStepError(
            ErrorCode.INVALID_ARGUMENT,
            f"float16 loss scaling: the gradients overflowed at loss scale {scale:g}; step not "
            f"applied, the scale is now {scale * state.scaler.get_backoff_factor():g}: retry "
            "the request",
        )
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm) and finite_out
    if not agree(finite):  # every rank steps, or none (issue 13)
        raise NonFiniteStepError(
            ErrorCode.INVALID_ARGUMENT,
            f"non-finite loss ({loss_value}), rewards or gradient norm ({grad_norm}); "
            "step not applied",
        )
    return grad_norm


def apply_update(state: TrainState) -> None:
    """``optimizer.step()``, acknowledged only when every updated parameter and moment is
    finite (see :mod:`dpo_service.engine.step_guard` for ``verify`` vs ``snapshot``)."""
    optimizer = state.optimizer
    snapshot = None
    if state.rollback is StepRollback.SNAPSHOT:
        snapshot = StepSnapshot(optimizer)
    else:
        bad = dry_run(optimizer, state.param_names)
        if not agree(bad is None):
            bad = bad or "a parameter shard on another rank"
            raise NonFiniteStepError(
                ErrorCode.INVALID_ARGUMENT,
                f"the optimizer update would make {bad} non-finite (learning rate or "
                "weights out of range?); step not applied, weights and optimizer state "
                "unchanged",
            )
    optimizer.step()
    if agree(updated_finite(optimizer)):
        return
    if snapshot is not None:
        snapshot.restore()
        raise NonFiniteStepError(
            ErrorCode.INVALID_ARGUMENT,
            "the optimizer step left non-finite weights; they and the optimizer state were "
            "restored to their pre-step values; step not applied",
        )
    state.halted = "a step left non-finite weights that could not be restored"
    raise NonFiniteStepError(
        ErrorCode.INTERNAL,
        "the optimizer step left non-finite weights after its update was verified finite; "
        "training is stopped (DPO_STEP_ROLLBACK=snapshot restores such steps)",
    )


def run_train_step(state: TrainState, request: PreparedRequest, settings: Settings) -> LossResult:
    """One optimizer step on ``request``'s pairs; returns the loss computed before the step
    (see the module docstring for the order of the checks)."""
    remembered = replayed(state, request)
    if remembered is not None:
        return remembered
    check_expected_version(state, request)
    check_not_halted(state)
    model = state.bundle.model
    state.optimizer.zero_grad(set_to_none=True)
    model.train()
    unscaled = False
    try:
        parts = accumulate_gradients(state, request, settings)
        if state.scaler.is_enabled():
            state.scaler.unscale_(state.optimizer)
            unscaled = True
        grad_norm = clip_and_check(state, parts, request.num_pairs, settings.max_grad_norm)
        apply_update(state)
    finally:
        if unscaled:  # halves the scale after an overflow, else counts a good step
            state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        model.eval()
    inputs, out = merge_parts(parts, request.num_pairs)
    request_id = request.request_id or uuid.uuid4().hex
    result = result_from(request, inputs, out, state.version, request_id)
    state.version += 1
    state.last_train_loss = result.loss
    result = result.trained_as(grad_norm=grad_norm, new_version=state.version)
    if request.request_id is not None:
        state.completed.remember(request.request_id, result, request.digest)
    return result
