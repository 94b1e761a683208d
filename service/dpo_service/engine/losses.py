"""From sequence log-probs to losses: the reference choice, the loss call, and the
bookkeeping of micro-batches (rows of a coalesced batch, parts of a train step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpo_service.engine.preparation import PreparedRequest
from dpo_service.errors import ErrorCode, ServiceError
from modern_llm.alignment.dpo_loss import LossOutput, PreferenceLogps, preference_loss
from modern_llm.alignment.logprobs import SequenceLogps

#: One micro-batch of a train step: request-local pair indices, its (detached) loss inputs
#: and its loss output.
Part = tuple[list[int], PreferenceLogps, LossOutput]


def preference_inputs(
    request: PreparedRequest,
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    idx: Sequence[int],
) -> PreferenceLogps:
    """Loss inputs for the request-local pairs ``idx``; ``policy`` and ``reference`` hold
    exactly those pairs' rows, in that order."""
    ref_c = ref_r = None
    if request.reference == "provided":
        assert request.reference_chosen is not None and request.reference_rejected is not None
        device = policy.chosen.device
        ref_c = torch.tensor([request.reference_chosen[i] for i in idx], device=device)
        ref_r = torch.tensor([request.reference_rejected[i] for i in idx], device=device)
    elif request.reference == "frozen":
        assert reference is not None
        ref_c, ref_r = reference.chosen.float(), reference.rejected.float()
    return PreferenceLogps(
        policy_chosen=policy.chosen.float(),
        policy_rejected=policy.rejected.float(),
        reference_chosen=ref_c,
        reference_rejected=ref_r,
        chosen_lengths=policy.chosen_tokens.float(),
        rejected_lengths=policy.rejected_tokens.float(),
    )


def compute_loss(request: PreparedRequest, inputs: PreferenceLogps) -> LossOutput:
    """The request's loss; a loss-function ``ValueError`` is the caller's 422."""
    try:
        return preference_loss(inputs, request.loss)
    except ValueError as exc:
        raise ServiceError(ErrorCode.INVALID_ARGUMENT, f"loss: {exc}") from exc


def rows_of(logps: SequenceLogps, rows: slice) -> SequenceLogps:
    """The ``rows`` of a coalesced batch's log-probs."""
    return SequenceLogps(
        chosen=logps.chosen[rows],
        rejected=logps.rejected[rows],
        chosen_tokens=logps.chosen_tokens[rows],
        rejected_tokens=logps.rejected_tokens[rows],
    )


def detached(x: PreferenceLogps) -> PreferenceLogps:
    def d(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    return PreferenceLogps(
        policy_chosen=x.policy_chosen.detach(),
        policy_rejected=x.policy_rejected.detach(),
        reference_chosen=d(x.reference_chosen),
        reference_rejected=d(x.reference_rejected),
        chosen_lengths=d(x.chosen_lengths),
        rejected_lengths=d(x.rejected_lengths),
    )


def _in_request_order(
    pieces: list[tuple[list[int], torch.Tensor | None]], n: int
) -> torch.Tensor | None:
    """Per-micro-batch tensors put back in request order (None when the parts have none)."""
    first = pieces[0][1]
    if first is None:
        return None
    merged = torch.empty(n, dtype=first.dtype, device=first.device)
    for idx, t in pieces:
        assert t is not None
        merged[torch.tensor(idx, device=first.device)] = t.detach()
    return merged


def _required(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None
    return t


def merge_parts(parts: list[Part], n: int) -> tuple[PreferenceLogps, LossOutput]:
    """The whole request's loss inputs and output from its micro-batches."""

    def inputs_field(name: str) -> torch.Tensor | None:
        return _in_request_order([(g, getattr(i, name)) for g, i, _ in parts], n)

    def output_field(name: str) -> torch.Tensor:
        return _required(_in_request_order([(g, getattr(o, name)) for g, _, o in parts], n))

    inputs = PreferenceLogps(
        policy_chosen=_required(inputs_field("policy_chosen")),
        policy_rejected=_required(inputs_field("policy_rejected")),
        reference_chosen=inputs_field("reference_chosen"),
        reference_rejected=inputs_field("reference_rejected"),
        chosen_lengths=inputs_field("chosen_lengths"),
        rejected_lengths=inputs_field("rejected_lengths"),
    )
    losses = output_field("losses")
    out = LossOutput(
        loss=losses.mean(),
        losses=losses,
        rewards_chosen=output_field("rewards_chosen"),
        rewards_rejected=output_field("rewards_rejected"),
        margins=output_field("margins"),
        accuracies=output_field("accuracies"),
    )
    return inputs, out
