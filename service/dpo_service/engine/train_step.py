"""One online training step, as named steps run in order on the engine's worker thread:

1. :func:`replayed`: a ``request_id`` seen before answers its first result, applies nothing;
2. :func:`check_expected_version`: a stale ``expected_version`` is a 409;
3. :func:`accumulate_gradients`: length-sorted micro-batches under ``max_batch_tokens``,
   each with its reference pass (when the frozen copy is used), loss and backward; every loss
   is a mean of per-pair terms, so the accumulated gradient is that of the whole batch;
4. :func:`clip_and_check`: gradient clipping, then nothing is applied when the loss, a
   statistic or the gradient norm is not finite (:class:`NonFiniteStepError`);
5. the optimizer step, the version bump, and the result remembered under its ``request_id``.
"""

from __future__ import annotations

import math
import uuid

import torch

from dpo_service.engine.forward import forward_logps, micro_batches, strategy_for
from dpo_service.engine.losses import (
    Part,
    compute_loss,
    detached,
    merge_parts,
    preference_inputs,
)
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.results import LossResult, all_finite, result_from
from dpo_service.engine.train_state import TrainState
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens, SequenceLogps, pair_logps


class NonFiniteStepError(ServiceError):
    """A train step whose loss, rewards or gradients are not finite (nothing was applied)."""


def replayed(state: TrainState, request: PreparedRequest) -> LossResult | None:
    """The remembered result of a retried ``request_id``, else None."""
    if request.request_id is None:
        return None
    return state.completed.get(request.request_id)


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
        ref = forward_logps(state.reference, pairs, settings, state.bundle)
    return SequenceLogps(
        ref.chosen.clone(), ref.rejected.clone(), ref.chosen_tokens, ref.rejected_tokens
    )


def accumulate_gradients(
    state: TrainState, request: PreparedRequest, settings: Settings
) -> list[Part]:
    """Forward, loss and backward of every micro-batch; returns the detached parts."""
    n = request.num_pairs
    parts: list[Part] = []
    for group in micro_batches(request.pairs, settings.max_batch_tokens):
        sub = [request.pairs[i] for i in group]
        ref = _reference_logps(state, sub, settings) if request.reference == "frozen" else None
        logps = pair_logps(
            state.bundle.causal_lm,
            sub,
            strategy=strategy_for(settings, state.bundle),
            chunk_size=settings.logp_chunk_size,
            pad_id=state.bundle.tokenizer.pad_id,
        )
        inputs = preference_inputs(request, logps, ref, group)
        out = compute_loss(request, inputs)
        (out.losses.sum() / n).backward()
        parts.append((group, detached(inputs), out))
    return parts


def clip_and_check(state: TrainState, parts: list[Part], n: int, max_norm: float) -> float:
    """Clip the accumulated gradient; returns its norm before clipping. Raises
    :class:`NonFiniteStepError` when the loss, a statistic or the norm is not finite."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.trainable(), max_norm))
    loss_value = sum(float(o.losses.detach().sum()) for _, _, o in parts) / n
    finite_out = all(all_finite(o) for _, _, o in parts)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm) and finite_out):
        raise NonFiniteStepError(
            ErrorCode.INVALID_ARGUMENT,
            f"non-finite loss ({loss_value}), rewards or gradient norm ({grad_norm}); "
            "step not applied",
        )
    return grad_norm


def run_train_step(state: TrainState, request: PreparedRequest, settings: Settings) -> LossResult:
    """One optimizer step on ``request``'s pairs; returns the loss computed before the step
    (see the module docstring for the order of the checks)."""
    remembered = replayed(state, request)
    if remembered is not None:
        return remembered
    check_expected_version(state, request)
    model = state.bundle.model
    state.optimizer.zero_grad(set_to_none=True)
    model.train()
    try:
        parts = accumulate_gradients(state, request, settings)
        grad_norm = clip_and_check(state, parts, request.num_pairs, settings.max_grad_norm)
        state.optimizer.step()
    finally:
        state.optimizer.zero_grad(set_to_none=True)
        model.eval()
    inputs, out = merge_parts(parts, request.num_pairs)
    request_id = request.request_id or uuid.uuid4().hex
    result = result_from(request, inputs, out, state.version, request_id)
    state.version += 1
    state.last_train_loss = result.loss
    result = result.trained_as(grad_norm=grad_norm, new_version=state.version)
    if request.request_id is not None:
        state.completed.remember(request.request_id, result)
    return result
