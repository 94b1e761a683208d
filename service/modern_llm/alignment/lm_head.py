"""Which LM head computes the response log-probs: chunked (streaming) or stored (faster to
train when its memory fits), see :class:`LmHead`."""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from modern_llm.alignment.linear_logps import (
    linear_token_logps,
    matmul_dtype,
    stored_head_bytes,
    stored_token_logps,
)
from modern_llm.alignment.linear_logps import memory_budget_bytes as device_memory_budget

__all__ = ["LmHead", "head_token_logps", "resolve_head"]


class LmHead(str, Enum):
    """How the LM head turns the N response positions into log-probs.

    - ``CHUNKED``: :func:`~modern_llm.alignment.linear_logps.linear_token_logps`, (rows ×
      vocabulary) blocks, logits recomputed in backward; extra memory one cache-sized block.
    - ``STORED``: :func:`~modern_llm.alignment.linear_logps.stored_token_logps`, the (N, V)
      float32 softmax kept for backward (no recompute: about 20% faster train steps in
      ``bench/``); extra memory :func:`~modern_llm.alignment.linear_logps.stored_head_bytes`.
    - ``AUTO``: ``STORED`` when gradients are needed and its memory fits the budget, else
      ``CHUNKED`` (passes without autograd are already streaming: nothing to store).
    """

    AUTO = "auto"
    CHUNKED = "chunked"
    STORED = "stored"


def resolve_head(
    head: LmHead | str,
    grad: bool,
    n_positions: int,
    vocab: int,
    d_model: int,
    matmul_dtype: torch.dtype,
    budget_bytes: int | None,
    device: torch.device,
) -> LmHead:
    """The concrete LM head ``AUTO`` stands for (see :class:`LmHead`); ``budget_bytes`` None:
    :func:`~modern_llm.alignment.linear_logps.memory_budget_bytes` of ``device``."""
    head = LmHead(head)
    if head is not LmHead.AUTO:
        return head
    if not grad:
        return LmHead.CHUNKED
    need = stored_head_bytes(n_positions, vocab, d_model, matmul_dtype)
    budget = device_memory_budget(device) if budget_bytes is None else budget_bytes
    return LmHead.STORED if need <= budget else LmHead.CHUNKED


def head_token_logps(
    hidden: Tensor,
    targets: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    head: LmHead | str,
    chunk_size: int,
    budget_bytes: int | None,
) -> tuple[Tensor, LmHead]:
    """Token log-probs (N,) float32 of ``targets`` (N,) from the hidden states (N, D) under
    the LM head ``weight`` (V, D) / ``bias``, and the head that computed them (``AUTO``
    resolved with :func:`resolve_head`; gradients are needed when autograd records them)."""
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    vocab, d_model = weight.shape
    dtype = matmul_dtype(hidden, weight)
    n = targets.shape[0]
    head = resolve_head(head, grad, n, vocab, d_model, dtype, budget_bytes, hidden.device)
    if head is LmHead.STORED:
        return stored_token_logps(hidden, targets, weight, bias), head
    return linear_token_logps(hidden, targets, weight, chunk_size, bias), head
