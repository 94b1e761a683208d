"""The service's paths, run in process, and the ablations that measure each lever.

- ``engine loss``: :func:`dpo_service.engine.forward.forward_logps` under ``inference_mode`` with the
  engine's default settings (length-bucketed micro-batches, ``auto`` layout, chunked LM head)
  plus the DPO loss: what :class:`~dpo_service.engine.engine.Engine` runs for a loss-only batch.
- ``engine train``: :func:`dpo_service.engine.train_step.run_train_step` (forward, loss, backward, clip,
  AdamW), what the engine runs for ``train=true``.
- ablations: one lever at a time (one pass instead of two, the chunked LM head, each layout,
  the LM-head backward variants, bucketing off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dpo_service.engine.forward import forward_logps
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.train_state import TrainState
from dpo_service.engine.train_step import run_train_step
from dpo_service.models.bundle import ByteTripleTokenizer, ModelBundle
from dpo_service.settings import Settings
from modern_llm.alignment import logprobs
from modern_llm.alignment.dpo_loss import LossConfig, dpo_loss
from modern_llm.alignment.logprobs import LogpStrategy, PairTokens, pair_logps
from modern_llm.models.transformer import ModernDecoderLM


class Harness:
    """The engine's state around one model, with the engine's default settings."""

    def __init__(self, model: ModernDecoderLM, **overrides: Any) -> None:
        self.settings = Settings(**overrides)
        self.model = model.eval()
        bundle = ModelBundle(
            model=model,
            tokenizer=ByteTripleTokenizer(),
            name="bench",
            kind="modern_llm",
            vocab_size=model.config.vocab_size,
            max_seq_len=model.config.max_seq_len,
        )
        self.state = TrainState.create(bundle, self.settings)

    def loss(self, pairs: list[PairTokens]) -> Tensor:
        with torch.inference_mode():
            logps = forward_logps(self.model, pairs, self.settings, self.state.bundle)
            return dpo_loss(logps.chosen, logps.rejected, beta=0.1)

    def train(self, pairs: list[PairTokens]) -> float:
        request = PreparedRequest(
            pairs=pairs,
            loss=LossConfig(beta=0.1),
            reference="none",
            reference_chosen=None,
            reference_rejected=None,
            train=True,
            request_id=None,
            expected_version=None,
            num_tokens=sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs),
        )
        return run_train_step(self.state, request, self.settings).loss


# ------------------------------------------------------------------------------ ablations


def one_pass_full_logits(model: ModernDecoderLM, pairs: list[PairTokens]) -> Tensor:
    """Lever 1 alone: chosen and rejected as 2B rows of ONE forward pass, but still the full
    (2B, T, V) float32 log-softmax."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.zeros(len(rows), width - 1)
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [len(p.prompt) for p in pairs] * 2
    for i, (plen, resp) in enumerate(zip(prompts, responses, strict=True)):
        mask[i, plen - 1 : plen - 1 + len(resp)] = 1.0
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids)["logits"].float(), dim=-1)
        sums = (log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum(-1)
        b = len(pairs)
        return dpo_loss(sums[:b], sums[b:], beta=0.1)


def library_loss(strategy: LogpStrategy) -> Callable[[ModernDecoderLM, list[PairTokens]], Tensor]:
    """``pair_logps`` with one layout, the whole batch as one micro-batch."""

    def run(model: ModernDecoderLM, pairs: list[PairTokens]) -> Tensor:
        with torch.inference_mode():
            out = pair_logps(model, pairs, strategy=strategy, chunk_size=2048)
            return dpo_loss(out.chosen, out.rejected, beta=0.1)

    return run


def _old_chunk(h: Tensor, t: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    logits = F.linear(h, w, b).float()  # (chunk, V): the whole vocabulary at once
    return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _unblocked(recompute: bool) -> Callable[..., Tensor]:
    """The LM head as autograd ops over (chunk, V) logits: with ``recompute`` each chunk is
    activation-checkpointed (the seed library's first version), else autograd keeps every
    chunk's logits for backward."""

    def head(
        hidden: Tensor, targets: Tensor, weight: Tensor, chunk_size: int, bias: Tensor | None = None
    ) -> Tensor:
        grad = torch.is_grad_enabled() and hidden.requires_grad
        out = []
        for s in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[s : s + chunk_size], targets[s : s + chunk_size]
            if grad and recompute:
                out.append(checkpoint(_old_chunk, h, t, weight, bias, use_reentrant=False))
            else:
                out.append(_old_chunk(h, t, weight, bias))
        return torch.cat(out)

    return head


@contextmanager
def lm_head_variant(name: str) -> Iterator[None]:
    """Swap the library's LM head for ``checkpointed`` or ``stored`` (unblocked autograd)."""
    original = logprobs.linear_token_logps
    logprobs.linear_token_logps = _unblocked(recompute=name == "checkpointed")  # type: ignore[assignment]
    try:
        yield
    finally:
        logprobs.linear_token_logps = original  # type: ignore[assignment]


def train_step_with(
    harness: Harness, strategy: str | None = None, head: str | None = None
) -> Callable[[list[PairTokens]], float]:
    """The engine's train step with another layout and/or LM-head variant."""

    def run(pairs: list[PairTokens]) -> float:
        saved = harness.settings
        if strategy is not None:
            harness.settings = saved.model_copy(update={"logp_strategy": strategy})
        try:
            if head is None:
                return harness.train(pairs)
            with lm_head_variant(head):
                return harness.train(pairs)
        finally:
            harness.settings = saved

    return run


def loss_without_bucketing(harness: Harness) -> Callable[[list[PairTokens]], Tensor]:
    """Lever 4 off: the whole batch as one micro-batch (padded to its longest pair)."""

    def run(pairs: list[PairTokens]) -> Tensor:
        return library_loss(LogpStrategy.AUTO)(harness.model, pairs)

    return run
