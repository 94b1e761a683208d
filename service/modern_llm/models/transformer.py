"""A small modern decoder-only language model (Llama-style).

Token embedding → ``n_layers`` pre-norm blocks (RMSNorm, grouped-query attention with RoPE via
``scaled_dot_product_attention``, RMSNorm, SwiGLU MLP) → final RMSNorm → LM head (tied to the
embedding by default). No dropout, no biases. Construction is deterministic in
``config.seed`` and leaves the global RNG untouched.

``model(input_ids)`` returns a dict with ``"logits"`` (B, T, V) and ``"loss"`` (or ``None``), as
the seed API documents. ``hidden_states`` and ``lm_head_weight`` are the lower-level entry
points used by :mod:`modern_llm.alignment.logprobs` (compute the LM head only where needed).
Weights are saved as ``config.json`` + ``model.safetensors``; nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, TypedDict, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modern_llm.models.blocks import Attention, DecoderBlock, SwiGLU
from modern_llm.models.config import ModernDecoderConfig
from modern_llm.models.ops import Packing, RMSNorm, additive_mask, apply_rope, build_mask
from modern_llm.models.persistence import CONFIG_NAME, read_pretrained, write_pretrained

__all__ = [
    "Attention",
    "CausalLMOutput",
    "DecoderBlock",
    "KVCache",
    "ModernDecoderConfig",
    "ModernDecoderLM",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
]

#: One ``(key, value)`` pair per layer, each (B, n_kv_heads, S_past, head_dim).
KVCache = list[tuple[Tensor, Tensor]]


class CausalLMOutput(TypedDict):
    """What ``ModernDecoderLM.forward`` returns."""

    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # scalar, or None without labels


class ModernDecoderLM(nn.Module):
    """Decoder-only causal LM (RoPE, RMSNorm, SwiGLU, GQA, optionally tied embeddings)."""

    #: ``hidden_states`` takes ``attn_mask`` together with a (tiled) ``past_key_values``.
    supports_prefix_cache = True
    #: ``hidden_states`` takes a ``token_mask`` and then skips padding in per-token layers.
    supports_token_mask = True

    def __init__(self, config: ModernDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ModernDecoderConfig()
        cfg = self.config
        with torch.device("meta"):  # allocate without touching the global RNG
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = (
                None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            )
        self.to_empty(device="cpu")
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Normal(0, init_std) weights, residual projections scaled by 1/sqrt(2·n_layers)."""
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, resid_std, generator=gen)
            else:
                p.normal_(0.0, cfg.init_std, generator=gen)

    @property
    def lm_head_weight(self) -> Tensor:
        """(V, D) output projection (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def lm_head_bias(self) -> Tensor | None:
        """The LM head has no bias."""
        return None

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward

    def _rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin (..., 1, hd) for integer positions (...), e.g. (B, T) → (B, T, 1, hd)."""
        hd = self.config.head_dim
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        exponent = torch.arange(0, hd, 2, device=pos.device, dtype=compute) / hd
        inv_freq = 1.0 / (self.config.rope_theta**exponent)  # (hd/2,)
        angles = pos.to(compute)[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat((angles, angles), dim=-1).unsqueeze(-2)  # (B, T, 1, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @overload
    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = ...,
        position_ids: Tensor | None = ...,
        attn_mask: Tensor | None = ...,
        past_key_values: KVCache | None = ...,
        use_cache: Literal[False] = ...,
        token_mask: Tensor | None = ...,
    ) -> Tensor: ...

    @overload
    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = ...,
        position_ids: Tensor | None = ...,
        attn_mask: Tensor | None = ...,
        past_key_values: KVCache | None = ...,
        use_cache: Literal[True],
        token_mask: Tensor | None = ...,
    ) -> tuple[Tensor, KVCache]: ...

    @overload
    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = ...,
        position_ids: Tensor | None = ...,
        attn_mask: Tensor | None = ...,
        past_key_values: KVCache | None = ...,
        use_cache: bool = ...,
        token_mask: Tensor | None = ...,
    ) -> Tensor | tuple[Tensor, KVCache]: ...

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        token_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """Final-normed hidden states (B, T, D), plus the new KV cache when ``use_cache``.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, S) 1/0 padding mask over past + current keys, combined with
                the causal (or explicit) mask.
            position_ids: (B, T) RoPE positions; default ``past_len + arange(T)``.
            attn_mask: explicit boolean "may attend" mask (B, 1, T, S) or (B, T, S); replaces
                the causal construction (used for prefix sharing).
            past_key_values: cache returned by an earlier call with ``use_cache=True``. A cache
                of batch B' dividing B is tiled: input row i continues cache row i mod B'
                (e.g. one cached prompt shared by its chosen and its rejected row).
            use_cache: also return the updated cache.
            token_mask: (B, T) bool, the real tokens; the others are padding no real token
                attends (right padding, or hidden by the mask). The per-token layers then run
                on the real tokens only; padding gets zero keys, values and hidden states.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if past_key_values is not None and len(past_key_values) != self.config.n_layers:
            raise ValueError(f"past_key_values needs {self.config.n_layers} layers")
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_key_values and b % past_key_values[0][0].shape[0] != 0:
            raise ValueError(f"past_key_values batch must divide the input batch {b}")
        device = input_ids.device
        if position_ids is None:
            if past_len + t > self.config.max_seq_len:
                raise ValueError(
                    f"sequence length {past_len + t} exceeds max_seq_len {self.config.max_seq_len}"
                )
            position_ids = torch.arange(past_len, past_len + t, device=device)[None].expand(b, t)
        elif position_ids.shape[-1] != t or position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (B, {t}), got {tuple(position_ids.shape)}")
        packing = None
        if token_mask is not None:
            if token_mask.shape != (b, t) or token_mask.dtype != torch.bool:
                raise ValueError(f"token_mask must be boolean ({b}, {t})")
            packing = Packing.from_mask(token_mask)
            input_ids, position_ids = packing.pack(input_ids), packing.pack(position_ids)
        x = self.embed_tokens(input_ids)  # (B, T, D), or (N, D) real tokens with a packing
        cos, sin = self._rope(position_ids, x.dtype)
        mask, is_causal = build_mask(b, t, past_len, attention_mask, attn_mask, device)
        mask = additive_mask(mask, x.dtype)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            x, kv = layer(x, cos, sin, mask, is_causal, past, packing)
            if use_cache:
                new_cache.append(kv)
        x = self.norm(x)
        if packing is not None:
            x = packing.pad(x)  # (B, T, D)
        return (x, new_cache) if use_cache else x

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits (B, T, V) and, given ``labels`` (B, T), the mean next-token cross-entropy.

        Labels are shifted inside (position t predicts ``labels[:, t+1]``); ``-100`` and
        padding positions (``attention_mask == 0``) are ignored.
        """
        h = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        logits = F.linear(h, self.lm_head_weight)  # (B, T, V)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must be {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B·(T-1), V)
            shift_labels = labels[:, 1:].reshape(-1)  # (B·(T-1),)
            total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            loss = total / (shift_labels != -100).sum().clamp_min(1)
        return {"logits": logits, "loss": loss}

    # ------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (tied weights once) atomically."""
        return write_pretrained(directory, self.config.to_dict(), self.state_dict())

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> ModernDecoderLM:
        """Load a model written by :meth:`save_pretrained` (safetensors only, never pickle)."""
        data, state, weights_path = read_pretrained(directory)
        try:
            config = ModernDecoderConfig.from_dict(data)
        except TypeError as exc:
            raise ValueError(f"invalid config in {Path(directory) / CONFIG_NAME}: {exc}") from exc
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"weights in {weights_path} do not match the config: {exc}") from exc
        return model.to(map_location)
