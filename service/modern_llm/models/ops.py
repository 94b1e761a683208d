"""Building blocks of :mod:`modern_llm.models.transformer` that are plain tensor functions.

Written for speed in eager mode on CPU as well as CUDA: the fused ``rms_norm`` kernel, RoPE in
two passes, one additive attention mask per forward instead of one per layer (CPU), a KV cache
shared by several rows without copies of it, SDPA's native grouped-query attention, and
:class:`Packing`: per-token layers on the real tokens of a right-padded batch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in at least float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # fused kernel
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., hd) by the angles whose cos/sin broadcast against it.

    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, written as one
    roll and two fused passes (``sin`` with its first half negated).
    """
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return torch.addcmul(x * cos, x.roll(half, dims=-1), signed_sin)


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """On CPU, turn a boolean mask into the additive float mask SDPA would build from it in
    every layer, once per forward (bool stays on CUDA, where the kernels take it directly)."""
    if mask is None or mask.device.type != "cpu":
        return mask
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def build_mask(
    b: int,
    t: int,
    past_len: int,
    attention_mask: Tensor | None,
    attn_mask: Tensor | None,
    device: torch.device,
) -> tuple[Tensor | None, bool]:
    """Boolean "may attend" mask (B|1, 1, T, S) and whether SDPA may use ``is_causal``."""
    s = past_len + t
    if attn_mask is None and attention_mask is None:
        if past_len == 0:
            return None, t > 1
        if t == 1:
            return None, False
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be boolean, got {attn_mask.dtype}")
        mask = attn_mask.unsqueeze(1) if attn_mask.dim() == 3 else attn_mask
        if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (t, s):
            raise ValueError(
                f"attn_mask must be (B,1,{t},{s}) or (B,{t},{s}), got {tuple(attn_mask.shape)}"
            )
    else:
        q_pos = torch.arange(past_len, s, device=device)[:, None]
        mask = (torch.arange(s, device=device)[None, :] <= q_pos)[None, None]  # (1,1,T,S)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, s):
            raise ValueError(
                f"attention_mask must be ({b}, {s}), got {tuple(attention_mask.shape)}"
            )
        mask = mask & attention_mask.to(torch.bool)[:, None, None, :]
    # A query with no allowed key (e.g. a left pad) attends to itself instead of giving NaN.
    diag = torch.zeros(t, s, dtype=torch.bool, device=device)
    rows = torch.arange(t, device=device)
    diag[rows, rows + past_len] = True
    mask = mask | (~mask.any(-1, keepdim=True) & diag)
    return mask, False


def extend_cache(past: Tensor, new: Tensor) -> Tensor:
    """``cat((past, new), dim=2)``; a past with fewer rows than ``new`` (a divisor) is tiled:
    row ``i`` of ``new`` continues row ``i % len(past)`` (one copy, no repeated cache)."""
    if past.shape[0] == new.shape[0]:
        return torch.cat((past, new), dim=2)
    b, pb, s = new.shape[0], past.shape[0], past.shape[2]
    out = new.new_empty(b, new.shape[1], s + new.shape[2], new.shape[3])
    out[:, :, :s].view(b // pb, pb, *past.shape[1:]).copy_(past[None])
    out[:, :, s:] = new
    return out


def use_gqa_kernel(device: torch.device, has_mask: bool) -> bool:
    """SDPA's native GQA (no repeated K/V): the CPU flash kernel supports it with or without a
    mask; on CUDA only the flash path (no mask) does, so repeat K/V there when masked."""
    return device.type == "cpu" or not has_mask


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a right-padded (B, T) batch are: per-token layers run on the
    ``index.numel()`` real tokens only, attention on the padded (B, T) layout."""

    index: Tensor  # (N,) flat positions b·T + t of the real tokens
    batch: int
    length: int

    @classmethod
    def from_mask(cls, token_mask: Tensor) -> Packing:
        b, t = token_mask.shape
        return cls(token_mask.reshape(-1).nonzero().squeeze(1), b, t)

    def pack(self, x: Tensor) -> Tensor:
        """(B, T, ...) → (N, ...): the real tokens' rows."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """(N, ...) → (B, T, ...), zeros at the padding (finite: attention never sees NaN)."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])  # fresh: in place is safe
        return out.index_copy_(0, self.index, x).view(self.batch, self.length, *x.shape[1:])
