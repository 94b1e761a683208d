"""The decoder block of :class:`~modern_llm.models.transformer.ModernDecoderLM`: pre-norm
grouped-query attention with RoPE, then a SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modern_llm.models.config import ModernDecoderConfig
from modern_llm.models.ops import Packing, RMSNorm, apply_rope, extend_cache, use_gqa_kernel


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: ModernDecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,  # (B, T, D), or (N, D) real tokens with ``packing``
        cos: Tensor,  # (B, T, 1, hd) or (N, 1, hd)
        sin: Tensor,
        mask: Tensor | None,  # (B|1, 1, T, S) bool "may attend" or additive float, or None
        is_causal: bool,
        past: tuple[Tensor, Tensor] | None,
        packing: Packing | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        hd, lead = self.head_dim, x.shape[:-1]
        # RoPE in the (..., heads, hd) layout the projections produce (contiguous), then a
        # free transpose to (B, heads, T, hd): SDPA's CPU kernel takes strided inputs.
        q = apply_rope(self.q_proj(x).view(*lead, self.n_heads, hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(*lead, self.n_kv_heads, hd), cos, sin)
        v = self.v_proj(x).view(*lead, self.n_kv_heads, hd)
        if packing is not None:  # real tokens → the padded (B, T) layout attention needs
            q, k, v = packing.pad(q), packing.pad(k), packing.pad(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past is not None:
            k, v = extend_cache(past[0], k), extend_cache(past[1], v)  # (B, Hkv, S, hd)
        new_kv = (k, v)
        groups = self.n_heads // self.n_kv_heads
        gqa = groups > 1 and use_gqa_kernel(x.device, mask is not None)
        if groups > 1 and not gqa:  # portable GQA: expand kv heads to match the query heads
            k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
        ).transpose(1, 2)  # (B, T, H, hd)
        if packing is not None:
            out = packing.pack(out)  # (N, H, hd)
        return self.o_proj(out.reshape(*lead, self.n_heads * hd)), new_kv


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModernDecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # no graph: reuse buffers


class DecoderBlock(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, cfg: ModernDecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        past: tuple[Tensor, Tensor] | None,
        packing: Packing | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, is_causal, past, packing)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv
