"""Data-parallel gradients of one train request (every rank; issue 13).

For each micro-batch every rank runs its share of the pairs (:mod:`.sharded`) forward, with
autograd, through the policy's DDP/FSDP2 view. The sequence log-probs are gathered on rank 0,
which alone holds the request's loss settings: it computes the loss of the whole micro-batch
on leaf copies of the gathered log-probs (the same loss code as world size 1) and gets
``∂loss/∂logp`` for every pair. That ``(2, G)`` tensor is broadcast, and every rank runs
``backward`` from its own log-probs with its rows of it, times the world size. DDP and FSDP2
average the gradients over the ranks, so the result is the sum over all pairs: exactly the
gradient world size 1 computes, up to the order of the float32 additions. A session's
adapter (not under DDP) is averaged by one flat all-reduce after the last micro-batch.

When rank 0's loss refuses the micro-batch (a 422), a status slot in the broadcast says so:
every rank still runs its backward (with zero gradients, so DDP and FSDP2 stay in step), then
all of them give the step up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dpo_service.engine.distributed import parallel, wire
from dpo_service.engine.distributed.parallel import WrappedLM
from dpo_service.engine.distributed.sharded import gather_logps, positions, share_of
from dpo_service.engine.distributed.world import World
from dpo_service.engine.forward import group_logps, micro_batches
from dpo_service.engine.precision import autocast
from dpo_service.engine.train_state import TrainState
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens, SequenceLogps

#: Rank 0's loss for one micro-batch: (its pairs' indices, their gathered log-probs as leaves
#: that require grad) -> the scalar whose gradient the step takes.
#: What a follower's :func:`sharded_gradients` returns when rank 0 refused the request.
REFUSED = ServiceError(ErrorCode.INVALID_ARGUMENT, "rank 0's loss refused the request")

LossOf = Callable[[list[int], SequenceLogps], torch.Tensor]


def train_command(
    world: World, state: TrainState, pairs: Sequence[PairTokens], *, tokens: bool, accumulate: bool
) -> wire.Command:
    """Rank 0's :data:`~wire.Op.TRAIN` for the model ``state`` trains."""
    return wire.Command(
        wire.Op.TRAIN,
        ints=[int(tokens), int(accumulate)],
        text=world.key_of(state.bundle.causal_lm),
        tensors=wire.encode_pairs(pairs),
    )


def _leaves(full: SequenceLogps) -> SequenceLogps:
    return SequenceLogps(
        chosen=full.chosen.detach().clone().requires_grad_(True),
        rejected=full.rejected.detach().clone().requires_grad_(True),
        chosen_tokens=full.chosen_tokens,
        rejected_tokens=full.rejected_tokens,
        chosen_token_logps=full.chosen_token_logps,
        rejected_token_logps=full.rejected_token_logps,
    )


def sharded_gradients(
    world: World,
    state: TrainState,
    pairs: Sequence[PairTokens],
    settings: Settings,
    *,
    tokens: bool,
    loss_of: LossOf | None,
) -> ServiceError | None:
    """Every rank: accumulate the request's gradient (module docstring). ``loss_of`` on rank
    0, None elsewhere. Returns rank 0's loss error when the step must be given up (on every
    rank: followers get a bare marker), else None. A failure of DDP's or FSDP2's own
    collectives inside backward fails the world (:meth:`World.guard`)."""
    with world.guard("train step"):
        lm = state.bundle.causal_lm
        view = world.train_view(lm)
        refused: ServiceError | None = None
        for group in micro_batches(pairs, settings.max_batch_tokens):
            mine, stand_in = share_of(group, world.rank, world.size)
            if isinstance(view, WrappedLM):
                view.gather_root()
            with autocast(lm.lm_head_weight.device, state.compute_dtype):
                local = group_logps(
                    view, [pairs[i] for i in mine], settings, state.bundle, tokens=tokens
                )
            full = gather_logps(world, local, group, pairs, tokens=tokens, stand_in=stand_in)
            g = len(group)
            grads = torch.zeros(2 * g + 1, dtype=torch.float32, device=world.device)
            if full is not None and refused is None:
                assert loss_of is not None
                leaves = _leaves(full)
                try:
                    state.scaler.scale(loss_of(list(group), leaves)).backward()
                    both = torch.stack([_grad(leaves.chosen), _grad(leaves.rejected)])
                    grads[: 2 * g] = both.reshape(-1).to(world.device, torch.float32)
                    grads[-1] = 1.0
                except ServiceError as exc:
                    refused = exc
            world.broadcast(grads)
            ok = bool(grads[-1].item() == 1.0)
            if not ok and refused is None:
                refused = REFUSED  # a follower: rank 0's loss refused the request
            if stand_in or not ok:  # no gradient, but the same backward (DDP/FSDP2 in step)
                g_c, g_r = torch.zeros_like(local.chosen), torch.zeros_like(local.rejected)
            else:
                rows = torch.tensor(positions(group, world.rank, world.size), device=world.device)
                both = grads[: 2 * g].view(2, g)[:, rows] * float(world.size)
                g_c = both[0].to(local.chosen.device, local.chosen.dtype)
                g_r = both[1].to(local.rejected.device, local.rejected.dtype)
            torch.autograd.backward([local.chosen, local.rejected], [g_c, g_r])
        if id(lm) not in world.wrapped:  # a session's adapter: replicated, not under DDP
            parallel.reduce_gradients(world, state.trainable())
        return refused


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)
