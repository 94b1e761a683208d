"""Model work the engine runs on its worker thread: log-probs, losses, optimizer steps.

Nothing here is called except from :class:`dpo_service.engine.Engine`'s worker thread.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.model_loader import ModelBundle
from dpo_service.preprocess import PreparedRequest
from dpo_service.schemas import LossResponse
from dpo_service.settings import LogpStrategyName, Settings
from modern_llm.alignment.dpo_loss import (
    LossOutput,
    PreferenceLogps,
    dpo_metrics,
    preference_loss,
)
from modern_llm.alignment.logprobs import (
    CausalLM,
    LogpStrategy,
    PairTokens,
    SequenceLogps,
    pair_logps,
)

log = logging.getLogger(__name__)

IDEMPOTENCY_CACHE_SIZE = 4096


class NonFiniteStepError(ServiceError):
    """A train step whose loss, rewards or gradients are not finite (nothing was applied)."""


@dataclass
class TrainState:
    """Model, optimizer, reference copy, version and the idempotency record."""

    bundle: ModelBundle
    optimizer: torch.optim.Optimizer
    reference: CausalLM | None
    version: int = 0
    completed: OrderedDict[str, LossResponse] = field(default_factory=OrderedDict)
    last_train_loss: float | None = None

    @classmethod
    def create(cls, bundle: ModelBundle, settings: Settings) -> TrainState:
        model = bundle.model
        reference: CausalLM | None = None
        if settings.keep_reference:
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            reference = ref  # type: ignore[assignment]
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            betas=(settings.adam_beta1, settings.adam_beta2),
        )
        return cls(bundle=bundle, optimizer=optimizer, reference=reference)

    def remember(self, request_id: str, response: LossResponse) -> None:
        self.completed[request_id] = response
        while len(self.completed) > IDEMPOTENCY_CACHE_SIZE:
            self.completed.popitem(last=False)


def strategy_for(settings: Settings, bundle: ModelBundle | None = None) -> LogpStrategy:
    """The configured layout; TWO_ROWS when ``bundle`` cannot take an explicit mask.

    ``auto`` is passed through: :func:`pair_logps` then picks per call, ``PREFIX_CACHE`` for
    loss-only work on a model that supports it (prompt once, KV cache reused by both responses)
    and ``SHARED_PREFIX`` when gradients are needed (one row, exact two-row gradients).
    """
    if bundle is not None and not bundle.supports_custom_mask:
        return LogpStrategy.TWO_ROWS
    return LogpStrategy(LogpStrategyName(settings.logp_strategy).value)


#: Fixed cost of one more forward pass, in padded positions (Python and kernel overhead).
GROUP_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 2048}


def micro_batches(
    pairs: Sequence[PairTokens], budget: int, *, overhead: int = GROUP_OVERHEAD_TOKENS["cpu"]
) -> list[list[int]]:
    """Indices of ``pairs`` sorted by length and cut into micro-batches.

    A micro-batch is a run of the length-sorted pairs whose padded size (members × longest
    shared-prefix row, prompt + chosen + rejected) stays within ``budget``; a pair longer than
    the budget gets one of its own. Among those cuts, the one with the fewest padded positions
    plus ``overhead`` per micro-batch is chosen (exact dynamic programme over the sorted order),
    so mixed lengths are split where padding would cost more than another pass.
    """
    lengths = [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
    order = sorted(range(len(pairs)), key=lengths.__getitem__)
    n = len(order)
    sorted_len = np.array([lengths[i] for i in order], dtype=np.float64)
    best = np.zeros(n + 1)  # best[i]: cost of the first i sorted pairs
    start = np.zeros(n + 1, dtype=np.int64)  # start[i]: first member of the group ending at i
    for i in range(1, n + 1):
        longest = sorted_len[i - 1]  # ascending: the last member sets the padded length
        lo = max(0, i - max(1, int(budget // longest)))
        members = np.arange(i - lo, 0, -1)  # group sizes for starts lo..i-1
        cost = best[lo:i] + members * longest + overhead
        k = int(np.argmin(cost))  # first minimum: the largest group among equals
        best[i], start[i] = cost[k], lo + k
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[int(start[end]) : end])
        end = int(start[end])
    return groups[::-1]


def _concat(parts: list[tuple[list[int], SequenceLogps]], n: int) -> SequenceLogps:
    device = parts[0][1].chosen.device
    out = SequenceLogps(
        chosen=torch.empty(n, dtype=torch.float32, device=device),
        rejected=torch.empty(n, dtype=torch.float32, device=device),
        chosen_tokens=torch.empty(n, dtype=torch.long, device=device),
        rejected_tokens=torch.empty(n, dtype=torch.long, device=device),
    )
    for idx, part in parts:
        index = torch.tensor(idx, device=device)
        out.chosen[index] = part.chosen.float()
        out.rejected[index] = part.rejected.float()
        out.chosen_tokens[index] = part.chosen_tokens
        out.rejected_tokens[index] = part.rejected_tokens
    return out


def forward_logps(
    model: CausalLM, pairs: Sequence[PairTokens], settings: Settings, state: TrainState
) -> SequenceLogps:
    """Response log-probs of ``pairs`` (run under ``inference_mode``), in length-sorted
    micro-batches (see :func:`micro_batches`).

    On CUDA with ``DPO_DTYPE`` bfloat16/float16 the matmuls run under autocast in that dtype
    (a no-op for weights already stored in it, the speed-up for float32 master weights); the
    log-softmax statistics stay float32 either way. CPU runs as stored.
    """
    device = model.lm_head_weight.device
    overhead = GROUP_OVERHEAD_TOKENS.get(device.type, GROUP_OVERHEAD_TOKENS["cuda"])
    strategy = strategy_for(settings, state.bundle)
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(settings.dtype)
    on_cuda = device.type == "cuda" and half is not None
    parts = []
    with torch.autocast("cuda", dtype=half) if on_cuda else contextlib.nullcontext():
        for group in micro_batches(pairs, settings.max_batch_tokens, overhead=overhead):
            logps = pair_logps(
                model,
                [pairs[i] for i in group],
                strategy=strategy,
                chunk_size=settings.logp_chunk_size,
                pad_id=state.bundle.tokenizer.pad_id,
            )
            parts.append((group, logps))
    return _concat(parts, len(pairs))


def _preference_inputs(
    request: PreparedRequest,
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    idx: list[int],
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


def _loss(request: PreparedRequest, inputs: PreferenceLogps) -> LossOutput:
    try:
        return preference_loss(inputs, request.loss)
    except ValueError as exc:
        raise ServiceError(ErrorCode.INVALID_ARGUMENT, f"loss: {exc}") from exc


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(x) for x in t.detach().float().cpu().tolist()]


def all_finite(out: LossOutput) -> bool:
    """Whether the loss and every per-pair statistic are finite numbers."""
    tensors = (out.loss, out.losses, out.rewards_chosen, out.rewards_rejected, out.margins)
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def response_from(
    request: PreparedRequest,
    inputs: PreferenceLogps,
    out: LossOutput,
    version: int,
    request_id: str,
) -> LossResponse:
    """Assemble the wire response from the loss output."""
    if not all_finite(out):
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT,
            "the loss or rewards are not finite for this input (beta or reference log-probs "
            "too large?)",
        )
    metrics = dpo_metrics(out, inputs)
    loss = float(out.loss.detach())
    return LossResponse(
        loss=loss,
        losses=_floats(out.losses) or [],
        chosen_logps=_floats(inputs.policy_chosen) or [],
        rejected_logps=_floats(inputs.policy_rejected) or [],
        reference_chosen_logps=_floats(inputs.reference_chosen),
        reference_rejected_logps=_floats(inputs.reference_rejected),
        rewards_chosen=_floats(out.rewards_chosen) or [],
        rewards_rejected=_floats(out.rewards_rejected) or [],
        margins=_floats(out.margins) or [],
        accuracy=float(out.accuracies.float().mean()),
        chosen_tokens=[int(x) for x in inputs.chosen_lengths.tolist()]
        if inputs.chosen_lengths is not None
        else [],
        rejected_tokens=[int(x) for x in inputs.rejected_lengths.tolist()]
        if inputs.rejected_lengths is not None
        else [],
        num_tokens=request.num_tokens,
        metrics=metrics,
        loss_type=request.loss.loss_type,
        beta=request.loss.beta,
        model_version=version,
        request_id=request_id,
    )


def _rows(logps: SequenceLogps, rows: slice) -> SequenceLogps:
    return SequenceLogps(
        chosen=logps.chosen[rows],
        rejected=logps.rejected[rows],
        chosen_tokens=logps.chosen_tokens[rows],
        rejected_tokens=logps.rejected_tokens[rows],
    )


def build_response(
    request: PreparedRequest,
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    rows: slice,
    version: int,
    *,
    request_id: str,
) -> LossResponse:
    """Loss-only response for the ``rows`` of a coalesced batch that belong to ``request``."""
    inputs = _preference_inputs(
        request,
        _rows(policy, rows),
        None if reference is None else _rows(reference, rows),
        list(range(request.num_pairs)),
    )
    return response_from(request, inputs, _loss(request, inputs), version, request_id)


def run_train_step(state: TrainState, request: PreparedRequest, settings: Settings) -> LossResponse:
    """One optimizer step on ``request``'s pairs; returns the loss computed before the step.

    Pairs are processed in length-sorted micro-batches under ``max_batch_tokens`` with gradient
    accumulation; every loss here is a mean of per-pair terms, so the accumulated gradient is
    that of the whole batch. Nothing is applied when the loss or gradient is not finite, and a
    retried ``request_id`` returns the first result without applying anything.
    """
    request_id = request.request_id or uuid.uuid4().hex
    if request.request_id is not None and request.request_id in state.completed:
        return state.completed[request.request_id]
    if request.expected_version is not None and request.expected_version != state.version:
        raise ServiceError(
            ErrorCode.CONFLICT,
            f"expected_version {request.expected_version} but the model is at version {state.version}",
        )
    model = state.bundle.model
    n = request.num_pairs
    parts: list[tuple[list[int], PreferenceLogps, LossOutput]] = []
    state.optimizer.zero_grad(set_to_none=True)
    model.train()
    try:
        for group in micro_batches(request.pairs, settings.max_batch_tokens):
            sub = [request.pairs[i] for i in group]
            ref = None
            if request.reference == "frozen":
                assert state.reference is not None
                with torch.inference_mode():
                    ref = forward_logps(state.reference, sub, settings, state)
                ref = SequenceLogps(
                    ref.chosen.clone(), ref.rejected.clone(), ref.chosen_tokens, ref.rejected_tokens
                )
            logps = pair_logps(
                state.bundle.causal_lm,
                sub,
                strategy=strategy_for(settings, state.bundle),
                chunk_size=settings.logp_chunk_size,
                pad_id=state.bundle.tokenizer.pad_id,
            )
            inputs = _preference_inputs(request, logps, ref, group)
            out = _loss(request, inputs)
            (out.losses.sum() / n).backward()
            parts.append((group, _detach_inputs(inputs), out))
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
        loss_value = sum(float(o.losses.detach().sum()) for _, _, o in parts) / n
        finite_out = all(all_finite(o) for _, _, o in parts)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm) and finite_out):
            raise NonFiniteStepError(
                ErrorCode.INVALID_ARGUMENT,
                f"non-finite loss ({loss_value}), rewards or gradient norm ({grad_norm}); "
                "step not applied",
            )
        state.optimizer.step()
    finally:
        state.optimizer.zero_grad(set_to_none=True)
        model.eval()
    version_before = state.version
    state.version += 1
    state.last_train_loss = loss_value
    inputs, out = _merge(parts, n)
    response = response_from(request, inputs, out, version_before, request_id).model_copy(
        update={"trained": True, "grad_norm": grad_norm, "new_model_version": state.version}
    )
    if request.request_id is not None:
        state.remember(request.request_id, response)
    return response


def _detach_inputs(x: PreferenceLogps) -> PreferenceLogps:
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


def _scatter(pieces: list[tuple[list[int], torch.Tensor | None]], n: int) -> torch.Tensor | None:
    """Put per-group tensors back in request order (None when the groups have none)."""
    if pieces[0][1] is None:
        return None
    first = pieces[0][1]
    merged = torch.empty(n, dtype=first.dtype, device=first.device)
    for idx, t in pieces:
        assert t is not None
        merged[torch.tensor(idx, device=first.device)] = t.detach()
    return merged


def _merge(
    parts: list[tuple[list[int], PreferenceLogps, LossOutput]], n: int
) -> tuple[PreferenceLogps, LossOutput]:
    def field_of(
        get: Callable[[PreferenceLogps, LossOutput], torch.Tensor | None],
    ) -> torch.Tensor | None:
        return _scatter([(g, get(i, o)) for g, i, o in parts], n)

    def req(t: torch.Tensor | None) -> torch.Tensor:
        assert t is not None
        return t

    inputs = PreferenceLogps(
        policy_chosen=req(field_of(lambda i, o: i.policy_chosen)),
        policy_rejected=req(field_of(lambda i, o: i.policy_rejected)),
        reference_chosen=field_of(lambda i, o: i.reference_chosen),
        reference_rejected=field_of(lambda i, o: i.reference_rejected),
        chosen_lengths=field_of(lambda i, o: i.chosen_lengths),
        rejected_lengths=field_of(lambda i, o: i.rejected_lengths),
    )
    losses = req(field_of(lambda i, o: o.losses))
    out = LossOutput(
        loss=losses.mean(),
        losses=losses,
        rewards_chosen=req(field_of(lambda i, o: o.rewards_chosen)),
        rewards_rejected=req(field_of(lambda i, o: o.rewards_rejected)),
        margins=req(field_of(lambda i, o: o.margins)),
        accuracies=req(field_of(lambda i, o: o.accuracies)),
    )
    return inputs, out
