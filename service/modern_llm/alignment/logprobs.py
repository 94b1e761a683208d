"""Batched, masked, chunked response log-probs for preference pairs.

For each pair ``(prompt, chosen, rejected)`` of token-id lists this computes

    logp_chosen = Σ_{t in chosen} log p(y_t | prompt, y_<t)

(and the same for ``rejected``) for the whole batch at once, with the prompt encoded once per
pair and without ever materialising a (B, T, V) log-softmax:

1. a layout packs the pairs into rows (see :class:`LogpStrategy`) and records, for every
   response token, the hidden state that predicts it (the position just before it), its
   target id and the sequence it belongs to;
2. the model returns final hidden states; only the N response positions are gathered;
3. :func:`~modern_llm.alignment.linear_logps.linear_token_logps` applies the LM head to those
   N positions only, in (rows × vocabulary) blocks with an online float32 log-sum-exp and a
   hand-written backward, so the extra memory is one cache-sized block, not ``T · V``;
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

from modern_llm.alignment.linear_logps import linear_token_logps

__all__ = [
    "CausalLM",
    "LogpStrategy",
    "PairTokens",
    "SequenceLogps",
    "pair_logps",
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
class PairTokens:
    """One preference pair: prompt (with BOS) and two responses (with EOS), all non-empty."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class SequenceLogps:
    """Per-pair summed response log-probs (float32) and response token counts (long)."""

    chosen: Tensor  # (B,)
    rejected: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,) long
    rejected_tokens: Tensor  # (B,) long


@dataclass
class _Layout:
    """Rows to run through the model and where the response tokens sit in them."""

    input_ids: Tensor  # (R, L) long
    position_ids: Tensor | None  # (R, L) long, None for the default 0..L-1
    segments: Tensor | None  # (R, L) 0 prompt / 1 chosen / 2 rejected / 3 pad (SHARED_PREFIX)
    gather_index: Tensor  # (N,) flat index into R·L of the hidden state predicting each token
    targets: Tensor  # (N,) target token ids
    sequence: Tensor  # (N,) output slot: pair i chosen → i, rejected → B + i


# ------------------------------------------------------------------------------------ layouts


def _validate(pairs: Sequence[PairTokens], vocab_size: int) -> None:
    if len(pairs) == 0:
        raise ValueError("pairs must be non-empty")
    for i, p in enumerate(pairs):
        for name in ("prompt", "chosen", "rejected"):
            ids = getattr(p, name)
            if len(ids) == 0:
                raise ValueError(f"pair {i}: {name} must be non-empty")
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise ValueError(f"pair {i}: {name} has token ids outside [0, {vocab_size})")


def _finish_layout(
    ids: list[list[int]],
    positions: list[list[int]] | None,
    segments: list[list[int]] | None,
    predictors: list[list[int]],
    responses: list[list[int]],
) -> _Layout:
    """Tensors of a layout; ``predictors[s]``/``responses[s]`` belong to output slot ``s``.

    Slot ``s`` lives in row ``s % len(ids)`` (two-rows: row s; shared-prefix: row s mod B).
    """
    n_rows, width = len(ids), len(ids[0])
    flat = [(s % n_rows) * width + q for s, preds in enumerate(predictors) for q in preds]
    return _Layout(
        input_ids=torch.tensor(ids, dtype=torch.long),  # (R, L)
        position_ids=None if positions is None else torch.tensor(positions, dtype=torch.long),
        segments=None if segments is None else torch.tensor(segments, dtype=torch.long),
        gather_index=torch.tensor(flat, dtype=torch.long),  # (N,)
        targets=torch.tensor([t for resp in responses for t in resp], dtype=torch.long),
        sequence=torch.tensor([s for s, r in enumerate(responses) for _ in r], dtype=torch.long),
    )


def build_two_rows_layout(pairs: Sequence[PairTokens], pad_id: int) -> _Layout:
    """2B right-padded rows: ``[prompt][chosen]`` for every pair, then ``[prompt][rejected]``."""
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompt_lens = [len(p.prompt) for p in pairs] * 2
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    width = max(len(r) for r in rows)
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    # Response token j of a row is predicted by the hidden state at position P-1+j.
    predictors = [
        list(range(plen - 1, plen - 1 + len(resp)))
        for plen, resp in zip(prompt_lens, responses, strict=True)
    ]
    return _finish_layout(ids, None, None, predictors, responses)


def build_shared_prefix_layout(pairs: Sequence[PairTokens], pad_id: int) -> _Layout:
    """B right-padded rows ``[prompt][chosen][rejected]`` with positions and segment ids.

    Positions are ``0..P-1, P..P+C-1, P..P+R-1`` so the rejected tokens see exactly the
    positions they would have in their own row; the first chosen and the first rejected token
    are both predicted from the last prompt position. Segments: 0 prompt, 1 chosen,
    2 rejected, 3 pad.
    """
    width = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    ids, pos, seg = [], [], []
    chosen_pred, rejected_pred = [], []
    for p in pairs:
        plen, clen, rlen = len(p.prompt), len(p.chosen), len(p.rejected)
        pad = width - plen - clen - rlen
        ids.append(p.prompt + p.chosen + p.rejected + [pad_id] * pad)
        pos.append([*range(plen + clen), *range(plen, plen + rlen), *[0] * pad])
        seg.append([0] * plen + [1] * clen + [2] * rlen + [3] * pad)
        chosen_pred.append(list(range(plen - 1, plen + clen - 1)))
        rejected_pred.append([plen - 1, *range(plen + clen, plen + clen + rlen - 1)])
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return _finish_layout(ids, pos, seg, chosen_pred + rejected_pred, responses)


def shared_prefix_mask(segments: Tensor) -> Tensor:
    """Boolean "may attend" mask (B, L, L) from segment ids (B, L).

    Query ``q`` may attend key ``k <= q`` when ``k`` is a prompt token or in ``q``'s own
    segment: prompt is causal, chosen sees prompt + earlier chosen, rejected sees prompt +
    earlier rejected (never chosen), pads see prompt + pads (never NaN, never seen by real
    tokens).
    """
    length = segments.shape[1]
    idx = torch.arange(length, device=segments.device)
    causal = idx[None, :] <= idx[:, None]  # (L, L)
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    return causal[None] & ((seg_k == 0) | (seg_k == seg_q))  # (B, L, L)


# ------------------------------------------------------------------------ prefix KV cache


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
    h_prompt, cache = model.hidden_states(prompt_ids.to(dev), use_cache=True)  # (B, Pmax, D)
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


def pair_logps(
    model: CausalLM,
    pairs: Sequence[PairTokens],
    *,
    strategy: LogpStrategy | str = LogpStrategy.AUTO,
    chunk_size: int = 2048,
    pad_id: int = 0,
    device: torch.device | str | None = None,
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
    """
    weight = model.lm_head_weight  # (V, D)
    bias: Tensor | None = getattr(model, "lm_head_bias", None)
    strategy = resolve_strategy(model, strategy, torch.is_grad_enabled() and weight.requires_grad)
    _validate(pairs, weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dev = torch.device(device) if device is not None else weight.device

    if strategy is LogpStrategy.PREFIX_CACHE:
        selected, targets, sequence = _prefix_cache_hidden(model, pairs, pad_id, dev)
    else:
        if strategy is LogpStrategy.TWO_ROWS:
            layout = build_two_rows_layout(pairs, pad_id)
        else:
            layout = build_shared_prefix_layout(pairs, pad_id)
        input_ids = layout.input_ids.to(dev, non_blocking=True)
        position_ids = None if layout.position_ids is None else layout.position_ids.to(dev)
        segments = layout.segments
        attn_mask = None if segments is None else shared_prefix_mask(segments.to(dev))
        hidden = model.hidden_states(input_ids, position_ids=position_ids, attn_mask=attn_mask)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (R·L, D)
        selected = hidden.index_select(0, layout.gather_index.to(dev))  # (N, D)
        targets, sequence = layout.targets.to(dev), layout.sequence.to(dev)
    token_logps = linear_token_logps(selected, targets, weight, chunk_size, bias)  # (N,)
    b = len(pairs)
    sums = torch.zeros(2 * b, dtype=torch.float32, device=dev).index_add(
        0, sequence, token_logps
    )  # (2B,)
    chosen_tokens = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.long, device=dev)
    rejected_tokens = torch.tensor([len(p.rejected) for p in pairs], dtype=torch.long, device=dev)
    return SequenceLogps(sums[:b], sums[b:], chosen_tokens, rejected_tokens)
