"""Splitting a micro-batch's pairs across ranks and gathering their log-probs on rank 0.

Every rank runs the same micro-batches (:func:`~dpo_service.engine.forward.micro_batches` of
the whole request: every rank holds all of its pairs, so each computes the same cut). Rank
``r`` takes the micro-batch's pairs ``r, r + W, r + 2W, ...`` of its length-sorted order, so
every rank gets pairs of about the same length. A rank whose share is empty (a micro-batch
of fewer pairs than ranks) runs the first pair as a stand-in, whose log-probs are dropped and
whose gradient is zero: every rank then runs the same number of forward and backward passes,
which DDP's and FSDP2's collectives require.

:func:`gather_logps` packs a share into one float64 vector (float32 sums and integer token
counts are exact in float64), pads it to the longest share (every rank knows every share's
size from the pairs), ``all_gather``\\ s it and, on rank 0, puts the rows back in micro-batch
order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpo_service.engine.distributed.world import World
from modern_llm.alignment.logprobs import PairTokens, SequenceLogps


def share_of(group: Sequence[int], rank: int, size: int) -> tuple[list[int], bool]:
    """This rank's pairs of ``group``, and whether they are a stand-in (an empty share)."""
    mine = list(group[rank::size])
    if mine:
        return mine, False
    return [group[0]], True


def _width(world: World, group: Sequence[int], pairs: Sequence[PairTokens], tokens: bool) -> int:
    widest = 0
    for r in range(world.size):
        share = group[r :: world.size]
        n_tok = sum(len(pairs[i].chosen) + len(pairs[i].rejected) for i in share) if tokens else 0
        widest = max(widest, 4 * len(share) + n_tok)
    return widest


def _pack(
    local: SequenceLogps, real: bool, tokens: bool, width: int, device: torch.device
) -> torch.Tensor:
    out = torch.zeros(width, dtype=torch.float64, device=device)
    if not real:
        return out
    pieces = [local.chosen, local.rejected, local.chosen_tokens, local.rejected_tokens]
    if tokens:
        assert local.chosen_token_logps is not None and local.rejected_token_logps is not None
        pieces += [*local.chosen_token_logps, *local.rejected_token_logps]
    flat = torch.cat([p.detach().reshape(-1).to(device, torch.float64) for p in pieces])
    out[: flat.numel()] = flat
    return out


def gather_logps(
    world: World,
    local: SequenceLogps,
    group: Sequence[int],
    pairs: Sequence[PairTokens],
    *,
    tokens: bool,
    stand_in: bool,
) -> SequenceLogps | None:
    """The log-probs of ``group``'s pairs, in ``group`` order, on rank 0 (None elsewhere)."""
    width = _width(world, group, pairs, tokens)
    chunks = world.all_gather(_pack(local, not stand_in, tokens, width, world.device))
    if not world.is_leader:
        return None
    g = len(group)
    dev = local.chosen.device
    chosen = torch.empty(g, dtype=torch.float32, device=dev)
    rejected = torch.empty(g, dtype=torch.float32, device=dev)
    c_tok = torch.empty(g, dtype=torch.long, device=dev)
    r_tok = torch.empty(g, dtype=torch.long, device=dev)
    c_lp: list[torch.Tensor] = [torch.empty(0)] * g
    r_lp: list[torch.Tensor] = [torch.empty(0)] * g
    for r, chunk in enumerate(chunks):
        share = list(group[r :: world.size])
        b = len(share)
        if b == 0:
            continue
        data = chunk.to(dev)
        pos = torch.arange(r, g, world.size, device=dev)[:b]  # their places in group order
        chosen[pos] = data[:b].float()
        rejected[pos] = data[b : 2 * b].float()
        c_tok[pos] = data[2 * b : 3 * b].long()
        r_tok[pos] = data[3 * b : 4 * b].long()
        if tokens:
            at = 4 * b
            for k, i in enumerate(share):
                n = len(pairs[i].chosen)
                c_lp[r + k * world.size] = data[at : at + n].float()
                at += n
            for k, i in enumerate(share):
                n = len(pairs[i].rejected)
                r_lp[r + k * world.size] = data[at : at + n].float()
                at += n
    return SequenceLogps(
        chosen=chosen,
        rejected=rejected,
        chosen_tokens=c_tok,
        rejected_tokens=r_tok,
        chosen_token_logps=c_lp if tokens else None,
        rejected_token_logps=r_lp if tokens else None,
    )


def positions(group: Sequence[int], rank: int, size: int) -> list[int]:
    """Where this rank's share sits in ``group`` (its rows of a gathered tensor)."""
    return list(range(rank, len(group), size))
