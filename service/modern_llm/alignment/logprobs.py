"""Batched, masked, chunked response log-probs for preference pairs.

For each pair ``(prompt, chosen, rejected)`` of token-id lists this computes

    logp_chosen = Σ_{t in chosen} log p(y_t | prompt, y_<t)

(and the same for ``rejected``) for the whole batch at once, with the prompt encoded once per
pair and without ever materialising a (B, T, V) log-softmax:

1. a layout packs the pairs into rows (see :class:`LogpStrategy`) and records, for every
   response token, the hidden state that predicts it (the position just before it), its
   target id and the sequence it belongs to;
2. the model returns final hidden states (a model with ``supports_token_mask`` gets the rows'
   real-token mask and runs its per-token layers on those tokens only, skipping the padding);
   only the N response positions are gathered;
3. the LM head runs on those N positions only (see :class:`LmHead`): by default, with autograd,
   :func:`~modern_llm.alignment.linear_logps.stored_token_logps` (the (N, V) softmax kept for
   backward: the faster step) when that fits the memory budget, else
   :func:`~modern_llm.alignment.linear_logps.linear_token_logps` (rows × vocabulary blocks with
   an online float32 log-sum-exp and a hand-written backward: one cache-sized block of extra
   memory, not ``N · V``), which also serves every pass without autograd;
4. ``index_add`` reduces token log-probs into per-sequence sums.

Works with any model that satisfies :class:`CausalLM` (``hidden_states`` + ``lm_head_weight``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from modern_llm.alignment.layouts import (
    PairTokens,
    _validate,
    build_shared_prefix_layout,
    build_two_rows_layout,
    shared_prefix_mask,
)
from modern_llm.alignment.lm_head import LmHead, head_token_logps, resolve_head

__all__ = [
    "CausalLM",
    "LmHead",
    "LogpStrategy",
    "PairTokens",
    "SequenceLogps",
    "build_shared_prefix_layout",
    "build_two_rows_layout",
    "pair_logps",
    "resolve_head",
    "resolve_strategy",
    "shared_prefix_mask",
]


@runtime_checkable
class CausalLM(Protocol):
    """What :func:`pair_logps` needs from a model.

    ``hidden_states`` returns final-normed hidden states (B, T, D) (before the LM head);
    ``attn_mask`` is an explicit boolean (B, T, S) "may attend" mask replacing the causal one;
    ``position_ids`` (B, T) are RoPE positions. ``lm_head_weight`` is (V, D). A model may also
    expose ``lm_head_bias`` (V,) or ``None``.
    """

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> Any: ...

    @property
    def lm_head_weight(self) -> Tensor: ...


class LogpStrategy(str, Enum):
    """How pairs are laid out for the single forward pass.

    - ``TWO_ROWS``: 2B rows ``[prompt][chosen]`` and ``[prompt][rejected]``, right-padded,
      plain causal attention (right padding needs no mask: real tokens never see later pads).
    - ``SHARED_PREFIX``: B rows ``[prompt][chosen][rejected]``; rejected tokens reuse the
      prompt's positions offset (``P..P+R-1``) and a boolean mask hides chosen from rejected,
      so the prompt is encoded once. Exact for training too (gradients match ``TWO_ROWS``).
    - ``PREFIX_CACHE``: two passes: the B prompts (causal, KV cache kept), then the 2B
      responses as rows attending to their pair's cached prompt (the cache is tiled, not
      re-encoded). Exact and differentiable too; needs a model with ``supports_prefix_cache``.
      Less attention work than ``SHARED_PREFIX`` (no chosen×rejected block, causal prompt).
    - ``AUTO``: ``PREFIX_CACHE`` without autograd when the model supports it (loss-only; the
      faster form on CPU in ``bench/``), else ``SHARED_PREFIX`` (the faster form for training).
    """

    AUTO = "auto"
    TWO_ROWS = "two_rows"
    SHARED_PREFIX = "shared_prefix"
    PREFIX_CACHE = "prefix_cache"


@dataclass
class SequenceLogps:
    """Per-pair summed response log-probs (float32) and response token counts (long).

    With ``pair_logps(..., return_token_logps=True)`` also every response's per-token
    log-probs: ``chosen_token_logps[i]`` is a float32 ``(n_c,)`` tensor for ``pairs[i].chosen``
    (token ``j`` scores ``pairs[i].chosen[j]``), summing to ``chosen[i]``; same for rejected.
    """

    chosen: Tensor  # (B,)
    rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,) long
    rejected_tokens: Tensor  # (B,) long
    chosen_token_logps: list[Tensor] | None = None  # B tensors (n_c,), only when asked for
    rejected_token_logps: list[Tensor] | None = None  # B tensors (n_r,)
    head: LmHead | None = None  # the LM head that ran (set by pair_logps)


# ------------------------------------------------------------------------ prefix KV cache


def _packed(model: CausalLM, token_mask: Tensor, dev: torch.device) -> dict[str, Any]:
    """``token_mask`` for a model that skips padding with it (``supports_token_mask``)."""
    if getattr(model, "supports_token_mask", False) and not bool(token_mask.all()):
        return {"token_mask": token_mask.to(dev)}
    return {}


def _prefix_cache_hidden(
    model: CausalLM, pairs: Sequence[PairTokens], pad_id: int, dev: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """``PREFIX_CACHE``: prompts once (B rows, causal, KV cache kept), then the 2B responses as
    rows that attend to their pair's cached prompt and causally to themselves.

    A response's last token predicts nothing, so pass 2 runs tokens ``0..n-2`` only; token 0 is
    predicted by the prompt's last hidden state. Returns the predicting hidden states (N, D),
    their targets (N,) and output slots (N,): all first tokens first, then the rest.
    """
    b = len(pairs)
    plens = [len(p.prompt) for p in pairs]
    pmax = max(plens)
    prompt_ids = torch.tensor([p.prompt + [pad_id] * (pmax - len(p.prompt)) for p in pairs])
    prompt_mask = torch.arange(pmax)[None, :] < torch.tensor(plens)[:, None]  # (B, Pmax)
    h_prompt, cache = model.hidden_states(
        prompt_ids.to(dev), use_cache=True, **_packed(model, prompt_mask, dev)
    )  # (B, Pmax, D)
    d = h_prompt.shape[-1]
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]  # slot s: row s
    last = torch.tensor([(s % b) * pmax + plens[s % b] - 1 for s in range(2 * b)], device=dev)
    hidden = [h_prompt.reshape(-1, d).index_select(0, last)]  # (2B, D): first tokens
    targets = [r[0] for r in responses]
    slots = list(range(2 * b))
    width = max(len(r) for r in responses) - 1
    if width > 0:
        ids = [r[:-1] + [pad_id] * (width - len(r) + 1) for r in responses]
        plen = torch.tensor(plens * 2)[:, None]  # (2B, 1)
        q = torch.arange(width)
        positions = plen + q[None, :]  # (2B, W)
        prompt_keys = torch.arange(pmax)[None, None, :] < plen[:, :, None]  # (2B, 1, Pmax)
        own_keys = (q[None, :] <= q[:, None])[None]  # (1, W, W) causal
        mask = torch.cat(
            (prompt_keys.expand(2 * b, width, pmax), own_keys.expand(2 * b, width, width)), -1
        )  # (2B, W, Pmax + W)
        h_resp = model.hidden_states(
            torch.tensor(ids).to(dev),
            position_ids=positions.to(dev),
            attn_mask=mask.to(dev),
            past_key_values=cache,  # batch B, tiled over the 2B rows by the model
            **_packed(
                model, q[None, :] < torch.tensor([len(r) - 1 for r in responses])[:, None], dev
            ),
        )  # (2B, W, D)
        flat = [s * width + j for s, r in enumerate(responses) for j in range(len(r) - 1)]
        hidden.append(h_resp.reshape(-1, d).index_select(0, torch.tensor(flat, device=dev)))
        targets += [t for r in responses for t in r[1:]]
        slots += [s for s, r in enumerate(responses) for _ in r[1:]]
    return (
        torch.cat(hidden) if len(hidden) > 1 else hidden[0],
        torch.tensor(targets, device=dev),
        torch.tensor(slots, device=dev),
    )


# ------------------------------------------------------------------------------ entry point


def resolve_strategy(model: CausalLM, strategy: LogpStrategy | str, grad: bool) -> LogpStrategy:
    """The concrete layout ``AUTO`` stands for (see :class:`LogpStrategy`)."""
    strategy = LogpStrategy(strategy)
    if strategy is not LogpStrategy.AUTO:
        return strategy
    if not grad and getattr(model, "supports_prefix_cache", False):
        return LogpStrategy.PREFIX_CACHE
    return LogpStrategy.SHARED_PREFIX


def _response_hidden(
    model: CausalLM,
    pairs: Sequence[PairTokens],
    strategy: LogpStrategy,
    pad_id: int,
    dev: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """The model's hidden states (N, D) at the positions predicting each response token, their
    target ids (N,) and output slots (N,), under a concrete layout."""
    if strategy is LogpStrategy.PREFIX_CACHE:
        return _prefix_cache_hidden(model, pairs, pad_id, dev)
    if strategy is LogpStrategy.TWO_ROWS:
        layout = build_two_rows_layout(pairs, pad_id)
    else:
        layout = build_shared_prefix_layout(pairs, pad_id)
    input_ids = layout.input_ids.to(dev, non_blocking=True)
    position_ids = None if layout.position_ids is None else layout.position_ids.to(dev)
    segments = layout.segments
    attn_mask = None if segments is None else shared_prefix_mask(segments.to(dev))
    hidden = model.hidden_states(
        input_ids,
        position_ids=position_ids,
        attn_mask=attn_mask,
        **_packed(model, layout.token_mask, dev),
    )
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (R·L, D)
    selected = hidden.index_select(0, layout.gather_index.to(dev))  # (N, D)
    return selected, layout.targets.to(dev), layout.sequence.to(dev)


def pair_logps(
    model: CausalLM,
    pairs: Sequence[PairTokens],
    *,
    strategy: LogpStrategy | str = LogpStrategy.AUTO,
    chunk_size: int = 2048,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    return_token_logps: bool = False,
    head: LmHead | str = LmHead.AUTO,
    memory_budget_bytes: int | None = None,
) -> SequenceLogps:
    """Summed response log-probs of every pair's chosen and rejected response.

    One forward pass for the whole batch (two for ``PREFIX_CACHE``: prompts, then responses;
    see :class:`LogpStrategy`); differentiable w.r.t. the model parameters unless run under
    ``no_grad``/``inference_mode``.

    Args:
        model: a :class:`CausalLM`.
        pairs: prompts include BOS, responses include EOS; all non-empty.
        strategy: layout, ``LogpStrategy`` or its string value.
        chunk_size: response positions per LM-head chunk (each swept over the vocabulary in
            cache-sized blocks: the extra memory does not grow with V or T).
        pad_id: id used for right padding (never predicted, never attended by real tokens).
        device: where to run; default the device of ``model.lm_head_weight``.
        return_token_logps: also return each response's per-token log-probs (see
            :class:`SequenceLogps`; as differentiable as the sums). Off: no extra work.
        head: LM head, :class:`LmHead` or its string value (``out.head`` says which ran).
        memory_budget_bytes: what ``head="auto"`` may spend on the stored head; None: half
            the free memory of the device (see ``linear_logps.memory_budget_bytes``).
    """
    weight = model.lm_head_weight  # (V, D)
    grad = torch.is_grad_enabled() and weight.requires_grad
    strategy = resolve_strategy(model, strategy, grad)
    head = LmHead(head)
    _validate(pairs, weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if memory_budget_bytes is not None and memory_budget_bytes < 0:
        raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
    dev = torch.device(device) if device is not None else weight.device

    selected, targets, sequence = _response_hidden(model, pairs, strategy, pad_id, dev)
    token_logps, head = head_token_logps(
        selected,
        targets,
        weight,
        getattr(model, "lm_head_bias", None),
        head=head,
        chunk_size=chunk_size,
        budget_bytes=memory_budget_bytes,
    )  # (N,)
    b = len(pairs)
    sums = torch.zeros(2 * b, dtype=torch.float32, device=dev).index_add(
        0, sequence, token_logps
    )  # (2B,)
    chosen_tokens = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.long, device=dev)
    rejected_tokens = torch.tensor([len(p.rejected) for p in pairs], dtype=torch.long, device=dev)
    out = SequenceLogps(sums[:b], sums[b:], chosen_tokens, rejected_tokens, head=head)
    if return_token_logps:
        out.chosen_token_logps, out.rejected_token_logps = _split_tokens(
            token_logps, sequence, pairs
        )
    return out


def _split_tokens(
    token_logps: Tensor, sequence: Tensor, pairs: Sequence[PairTokens]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-response float32 token log-probs, in token order, from the flat ``(N,)`` ones.

    Layouts list tokens slot by slot, in order, except ``PREFIX_CACHE``, which lists every
    response's first token first: a stable sort by slot puts each response's tokens together
    and keeps their order in every layout.
    """
    order = torch.sort(sequence, stable=True).indices  # (N,)
    counts = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    parts = token_logps.float().index_select(0, order).split(counts)
    return list(parts[: len(pairs)]), list(parts[len(pairs) :])
