"""How :func:`~modern_llm.alignment.logprobs.pair_logps` packs preference pairs into rows.

Each layout returns the rows to run through the model and, for every response token, the flat
index of the hidden state that predicts it, its target id and its output slot (pair ``i``'s
chosen response is slot ``i``, its rejected one ``B + i``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PairTokens",
    "build_shared_prefix_layout",
    "build_two_rows_layout",
    "shared_prefix_mask",
]


@dataclass
class PairTokens:
    """One preference pair: prompt (with BOS) and two responses (with EOS), all non-empty."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class _Layout:
    """Rows to run through the model and where the response tokens sit in them."""

    input_ids: Tensor  # (R, L) long
    position_ids: Tensor | None  # (R, L) long, None for the default 0..L-1
    segments: Tensor | None  # (R, L) 0 prompt / 1 chosen / 2 rejected / 3 pad (SHARED_PREFIX)
    gather_index: Tensor  # (N,) flat index into R·L of the hidden state predicting each token
    targets: Tensor  # (N,) target token ids
    sequence: Tensor  # (N,) output slot: pair i chosen → i, rejected → B + i
    token_mask: Tensor  # (R, L) bool: real tokens (False: right padding)


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
    lengths: list[int],
) -> _Layout:
    """Tensors of a layout; ``predictors[s]``/``responses[s]`` belong to output slot ``s``.

    Slot ``s`` lives in row ``s % len(ids)`` (two-rows: row s; shared-prefix: row s mod B);
    row ``r`` holds ``lengths[r]`` real tokens, then padding.
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
        token_mask=torch.arange(width)[None, :] < torch.tensor(lengths)[:, None],
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
    return _finish_layout(ids, None, None, predictors, responses, [len(r) for r in rows])


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
    lengths = [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
    return _finish_layout(ids, pos, seg, chosen_pred + rejected_pred, responses, lengths)


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
