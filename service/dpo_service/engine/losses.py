"""From sequence log-probs to losses: the reference choice, the loss call, and the
bookkeeping of micro-batches (rows of a coalesced batch, parts of a train step)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dpo_service.engine.preparation import PreparedRequest
from dpo_service.errors import ErrorCode, ServiceError
from modern_llm.alignment.composed_loss import ComposedOutput, composed_preference_loss
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


@dataclass
class RequestOutput(LossOutput):
    """``LossOutput`` plus what a request may ask for besides: each term of a composed loss
    (unweighted per-pair losses, in the request's order) and the per-token log-probs."""

    term_losses: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    chosen_token_logps: list[Tensor] | None = None  # detached, one per pair
    rejected_token_logps: list[Tensor] | None = None


def compute_loss(
    request: PreparedRequest, inputs: PreferenceLogps, logps: SequenceLogps | None = None
) -> RequestOutput:
    """The request's loss (the weighted total of a composed loss); with ``return_token_logps``
    the token log-probs of ``logps`` (the policy's, for the same pairs) ride along. A
    loss-function ``ValueError`` is the caller's 422."""
    try:
        if request.composed is not None:
            out: LossOutput = composed_preference_loss(inputs, request.composed)
        else:
            out = preference_loss(inputs, request.loss)
    except ValueError as exc:
        raise ServiceError(ErrorCode.INVALID_ARGUMENT, f"loss: {exc}") from exc
    result = RequestOutput(
        loss=out.loss,
        losses=out.losses,
        rewards_chosen=out.rewards_chosen,
        rewards_rejected=out.rewards_rejected,
        margins=out.margins,
        accuracies=out.accuracies,
    )
    if isinstance(out, ComposedOutput):
        result.term_losses, result.weights = out.term_losses, out.weights
    chosen = None if logps is None else logps.chosen_token_logps
    rejected = None if logps is None else logps.rejected_token_logps
    if request.return_token_logps and chosen is not None and rejected is not None:
        result.chosen_token_logps = [t.detach() for t in chosen]
        result.rejected_token_logps = [t.detach() for t in rejected]
    return result


def rows_of(logps: SequenceLogps, rows: slice) -> SequenceLogps:
    """The ``rows`` of a coalesced batch's log-probs."""
    return SequenceLogps(
        chosen=logps.chosen[rows],
        rejected=logps.rejected[rows],
        chosen_tokens=logps.chosen_tokens[rows],
        rejected_tokens=logps.rejected_tokens[rows],
        chosen_token_logps=None
        if logps.chosen_token_logps is None
        else logps.chosen_token_logps[rows],
        rejected_token_logps=(
            None if logps.rejected_token_logps is None else logps.rejected_token_logps[rows]
        ),
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


def _tokens_in_order(parts: list[Part], n: int, name: str) -> list[Tensor] | None:
    """Per-pair token log-prob lists of the parts put back in request order."""
    out: list[Tensor | None] = [None] * n
    for idx, _, o in parts:
        values = getattr(o, name, None)
        if values is None:
            return None
        for i, t in zip(idx, values, strict=True):
            out[i] = t
    return [_required(t) for t in out]


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
    first = parts[0][2]
    terms = first.term_losses if isinstance(first, RequestOutput) else {}
    out = RequestOutput(
        loss=losses.mean(),
        losses=losses,
        rewards_chosen=output_field("rewards_chosen"),
        rewards_rejected=output_field("rewards_rejected"),
        margins=output_field("margins"),
        accuracies=output_field("accuracies"),
        term_losses={
            name: _required(
                _in_request_order(
                    [(g, getattr(o, "term_losses", {})[name]) for g, _, o in parts], n
                )
            )
            for name in terms
        },
        weights=first.weights if isinstance(first, RequestOutput) else {},
        chosen_token_logps=_tokens_in_order(parts, n, "chosen_token_logps"),
        rejected_token_logps=_tokens_in_order(parts, n, "rejected_token_logps"),
    )
    return inputs, out
