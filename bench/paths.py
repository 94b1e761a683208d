"""The service's paths, run in process, and the ablations that measure each lever.

- ``engine loss``: :func:`dpo_service.engine.forward.forward_logps` under ``inference_mode`` with the
  engine's default settings (length-bucketed micro-batches, ``auto`` layout, chunked LM head)
  plus the DPO loss: what :class:`~dpo_service.engine.engine.Engine` runs for a loss-only batch.
- ``engine train``: :func:`dpo_service.engine.train_step.run_train_step` (forward, loss, backward, clip,
  AdamW), what the engine runs for ``train=true``.
- ablations: one lever at a time (one pass instead of two, the chunked LM head, each layout,
  bucketing off), and the previous defaults (padded rows, the chunked LM head in train
  steps) next to the new ones, each also on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_service.engine.forward import forward_logps
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.train_state import TrainState
from dpo_service.engine.train_step import run_train_step
from dpo_service.models.bundle import ByteTripleTokenizer, ModelBundle
from dpo_service.settings import LogpHeadName, Settings
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


@contextmanager
def padded_rows(model: ModernDecoderLM, on: bool = True) -> Iterator[None]:
    """The previous default: the model runs every padded position (no ``token_mask``)."""
    if on:
        model.supports_token_mask = False  # type: ignore[misc]
    try:
        yield
    finally:
        if on:
            del model.supports_token_mask


def train_step_with(
    harness: Harness,
    strategy: str | None = None,
    head: str | None = None,
    padded: bool = False,
) -> Callable[[list[PairTokens]], float]:
    """The engine's train step with another layout, LM head (``chunked``, ``stored``) and/or
    padded rows (see :func:`padded_rows`)."""
    update: dict[str, Any] = {} if strategy is None else {"logp_strategy": strategy}
    if head is not None:
        update["logp_head"] = LogpHeadName(head)

    def run(pairs: list[PairTokens]) -> float:
        saved = harness.settings
        harness.settings = saved.model_copy(update=update)
        try:
            with padded_rows(harness.model, padded):
                return harness.train(pairs)
        finally:
            harness.settings = saved

    return run


def loss_with_padded_rows(harness: Harness) -> Callable[[list[PairTokens]], Tensor]:
    """The previous loss-only default: every padded position through the model."""

    def run(pairs: list[PairTokens]) -> Tensor:
        with padded_rows(harness.model):
            return harness.loss(pairs)

    return run


def loss_without_bucketing(harness: Harness) -> Callable[[list[PairTokens]], Tensor]:
    """Lever 4 off: the whole batch as one micro-batch (rows padded to its longest pair)."""

    def run(pairs: list[PairTokens]) -> Tensor:
        return library_loss(LogpStrategy.AUTO)(harness.model, pairs)

    return run
