"""Baseline A: the textbook DPO path of the seed's example, written independently of the
library's fast path.

Two forward passes (the chosen batch, then the rejected batch), each through
``model(input_ids)["logits"]`` (the LM head on every position), a float32 ``log_softmax`` over
the whole (B, T, V) tensor, ``gather`` of the next-token log-probs, a masked sum over the
response tokens. The train step adds the seed's DPO loss, backward, gradient clipping and
AdamW. No batching across requests: each batch is run exactly as given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from modern_llm.alignment.logprobs import PairTokens
from modern_llm.models.transformer import ModernDecoderLM


def _sequence_logps(model: ModernDecoderLM, pairs: list[PairTokens], which: str) -> Tensor:
    """Summed log-probs (B,) of one response per pair: ``compute_sequence_logprobs`` of the
    seed, with the prompt tokens masked out."""
    rows = [p.prompt + getattr(p, which) for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # right padding
    labels = input_ids[:, 1:]  # token t+1 is predicted at position t
    mask = torch.zeros(labels.shape)
    for i, p in enumerate(pairs):
        start = len(p.prompt) - 1
        mask[i, start : start + len(getattr(p, which))] = 1.0
    logits = model(input_ids)["logits"]  # (B, T, V)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V) float32
    token_log_probs = log_probs[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * mask).sum(-1)


def textbook_logps(model: ModernDecoderLM, pairs: list[PairTokens]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed response log-probs, two forward passes."""
    return _sequence_logps(model, pairs, "chosen"), _sequence_logps(model, pairs, "rejected")


def textbook_loss(model: ModernDecoderLM, pairs: list[PairTokens], beta: float = 0.1) -> Tensor:
    """Loss only (no grad)."""
    with torch.no_grad():
        chosen, rejected = textbook_logps(model, pairs)
        return -F.logsigmoid(beta * (chosen - rejected)).mean()


def textbook_train_step(
    model: ModernDecoderLM,
    optimizer: torch.optim.Optimizer,
    pairs: list[PairTokens],
    beta: float = 0.1,
    max_grad_norm: float = 1.0,
) -> float:
    """Forward (two passes), DPO loss, backward, clip, AdamW step."""
    model.train()
    chosen, rejected = textbook_logps(model, pairs)
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())
