"""Forward passes for log-probs: the layout choice and length-sorted micro-batches.

Every pass runs in the compute dtype (:mod:`dpo_service.engine.precision`). Called only on
the engine's worker thread (:mod:`dpo_service.engine.engine`,
:mod:`dpo_service.engine.train_step`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dpo_service.engine.distributed import wire
from dpo_service.engine.distributed.parallel import WrappedLM
from dpo_service.engine.distributed.sharded import gather_logps, share_of
from dpo_service.engine.distributed.world import World, current
from dpo_service.engine.precision import autocast, compute_dtype_of
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import LogpStrategyName, Settings
from modern_llm.alignment.logprobs import (
    CausalLM,
    LogpStrategy,
    PairTokens,
    SequenceLogps,
    pair_logps,
)

#: Fixed cost of one more forward pass, in padded positions (Python and kernel overhead).
GROUP_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 2048}


def strategy_for(settings: Settings, bundle: ModelBundle | None = None) -> LogpStrategy:
    """The configured layout; TWO_ROWS when ``bundle`` cannot take an explicit mask.

    ``auto`` is passed through: :func:`pair_logps` then picks per call, ``PREFIX_CACHE`` for
    loss-only work on a model that supports it (prompt once, KV cache reused by both responses)
    and ``SHARED_PREFIX`` when gradients are needed (one row, exact two-row gradients).
    """
    if bundle is not None and not bundle.supports_custom_mask:
        return LogpStrategy.TWO_ROWS
    return LogpStrategy(LogpStrategyName(settings.logp_strategy).value)


def group_logps(
    model: CausalLM,
    pairs: Sequence[PairTokens],
    settings: Settings,
    bundle: ModelBundle,
    *,
    tokens: bool = False,
) -> SequenceLogps:
    """:func:`pair_logps` of one micro-batch with the configured layout, head and chunking
    (the caller sets autocast and the grad mode)."""
    return pair_logps(
        model,
        pairs,
        strategy=strategy_for(settings, bundle),
        chunk_size=settings.logp_chunk_size,
        pad_id=bundle.tokenizer.pad_id,
        head=settings.logp_head,
        memory_budget_bytes=settings.memory_budget_bytes,
        return_token_logps=tokens,
    )


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
    """Micro-batch log-probs back in the original pair order."""
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
    if all(part.chosen_token_logps is not None for _, part in parts):  # return_token_logps
        out.chosen_token_logps, out.rejected_token_logps = _tokens_in_order(parts, n)
    return out


def _tokens_in_order(
    parts: list[tuple[list[int], SequenceLogps]], n: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token log-prob lists of the micro-batches back in the original pair order."""
    chosen: list[torch.Tensor] = [torch.empty(0)] * n
    rejected: list[torch.Tensor] = [torch.empty(0)] * n
    for idx, part in parts:
        assert part.chosen_token_logps is not None and part.rejected_token_logps is not None
        for k, i in enumerate(idx):
            chosen[i], rejected[i] = part.chosen_token_logps[k], part.rejected_token_logps[k]
    return chosen, rejected


def forward_logps(
    model: CausalLM, pairs: Sequence[PairTokens], settings: Settings, bundle: ModelBundle,
    *, return_token_logps: bool = False,
) -> SequenceLogps:  # fmt: skip
    """Response log-probs of ``pairs`` under ``model`` (the policy or the frozen reference of
    ``bundle``), in length-sorted micro-batches (see :func:`micro_batches`), computed in the
    compute dtype ``DPO_DTYPE`` (autocast; the sums are float32). Call it under
    ``inference_mode``: it is the loss-only and reference path. ``return_token_logps``: also
    every response's per-token log-probs (``SequenceLogps.chosen_token_logps``)."""
    world = current()
    if world is not None:  # under torchrun: every rank computes its share (issue 13)
        wire.send(world, forward_command(world, model, pairs, return_token_logps))
        out = sharded_forward_logps(world, model, pairs, settings, bundle, return_token_logps)
        assert out is not None  # rank 0
        return out
    device = model.lm_head_weight.device
    overhead = GROUP_OVERHEAD_TOKENS.get(device.type, GROUP_OVERHEAD_TOKENS["cuda"])
    parts = []
    for group in micro_batches(pairs, settings.max_batch_tokens, overhead=overhead):
        with autocast(device, compute_dtype_of(settings.dtype)):
            logps = group_logps(
                model, [pairs[i] for i in group], settings, bundle, tokens=return_token_logps
            )
        parts.append((group, logps))
    return _concat(parts, len(pairs))


def forward_command(
    world: World, model: CausalLM, pairs: Sequence[PairTokens], tokens: bool
) -> wire.Command:
    """Rank 0's :data:`~wire.Op.FORWARD`: which model, the pairs, the token flag."""
    return wire.Command(
        wire.Op.FORWARD,
        ints=[int(tokens)],
        text=world.key_of(model),
        tensors=wire.encode_pairs(pairs),
    )


def sharded_forward_logps(
    world: World,
    model: CausalLM,
    pairs: Sequence[PairTokens],
    settings: Settings,
    bundle: ModelBundle,
    tokens: bool,
) -> SequenceLogps | None:
    """Every rank: :func:`forward_logps` with each micro-batch split across the ranks by pairs
    (:mod:`dpo_service.engine.distributed.sharded`); the result on rank 0, None elsewhere.
    Under FSDP2 the policy runs through its sharded root (its layers gather their weights)."""
    with world.guard("forward"):
        view = world.train_view(model) if world.parallel == "fsdp" else model
        device = model.lm_head_weight.device
        overhead = GROUP_OVERHEAD_TOKENS.get(device.type, GROUP_OVERHEAD_TOKENS["cuda"])
        # FSDP2 gathers weights into buffers it reuses in training: never inference tensors
        sharded = view is not model
        parts = []
        for group in micro_batches(pairs, settings.max_batch_tokens, overhead=overhead):
            mine, stand_in = share_of(group, world.rank, world.size)
            with (
                torch.inference_mode(not sharded and torch.is_inference_mode_enabled()),
                torch.no_grad(),
                autocast(device, compute_dtype_of(settings.dtype)),
            ):
                if isinstance(view, WrappedLM):
                    view.gather_root()
                local = group_logps(view, [pairs[i] for i in mine], settings, bundle, tokens=tokens)
            full = gather_logps(world, local, group, pairs, tokens=tokens, stand_in=stand_in)
            if full is not None:
                parts.append((group, full))
        return _concat(parts, len(pairs)) if world.is_leader else None
