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

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, TypedDict, overload

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from modern_llm.models.config import ModernDecoderConfig
from modern_llm.models.ops import RMSNorm, additive_mask, apply_rope, extend_cache, use_gqa_kernel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: One ``(key, value)`` pair per layer, each (B, n_kv_heads, S_past, head_dim).
KVCache = list[tuple[Tensor, Tensor]]


class CausalLMOutput(TypedDict):
    """What ``ModernDecoderLM.forward`` returns."""

    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # scalar, or None without labels


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
        x: Tensor,  # (B, T, D)
        cos: Tensor,  # (B, T, 1, hd)
        sin: Tensor,
        mask: Tensor | None,  # (B|1, 1, T, S) bool "may attend" or additive float, or None
        is_causal: bool,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, _ = x.shape
        hd = self.head_dim
        # RoPE in the (B, T, heads, hd) layout the projections produce (contiguous), then a
        # free transpose to (B, heads, T, hd): SDPA's CPU kernel takes strided inputs.
        q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, hd), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(b, t, self.n_kv_heads, hd), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, hd).transpose(1, 2)
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
        )  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * hd)  # (B, T, H·hd)
        return self.o_proj(out), new_kv


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
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, is_causal, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class ModernDecoderLM(nn.Module):
    """Decoder-only causal LM (RoPE, RMSNorm, SwiGLU, GQA, optionally tied embeddings)."""

    #: ``hidden_states`` takes ``attn_mask`` together with a (tiled) ``past_key_values``.
    supports_prefix_cache = True

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
        """cos/sin (B, T, 1, hd) for integer positions (B, T)."""
        hd = self.config.head_dim
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        exponent = torch.arange(0, hd, 2, device=pos.device, dtype=compute) / hd
        inv_freq = 1.0 / (self.config.rope_theta**exponent)  # (hd/2,)
        angles = pos.to(compute)[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat((angles, angles), dim=-1)[:, :, None]  # (B, T, 1, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _build_mask(
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
        x = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self._rope(position_ids, x.dtype)
        mask, is_causal = self._build_mask(b, t, past_len, attention_mask, attn_mask, device)
        mask = additive_mask(mask, x.dtype)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            x, kv = layer(x, cos, sin, mask, is_causal, past)
            if use_cache:
                new_cache.append(kv)
        x = self.norm(x)  # (B, T, D)
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
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config_text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        _atomic_write(
            out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})
        )
        _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(config_text, "utf-8"))
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> ModernDecoderLM:
        """Load a model written by :meth:`save_pretrained` (safetensors only, never pickle)."""
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory not found: {root}")
        config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"missing {path.name} in {root}")
        try:
            data = json.loads(config_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed {config_path}: {exc}") from exc
        try:
            config = ModernDecoderConfig.from_dict(data)
        except TypeError as exc:
            raise ValueError(f"invalid config in {config_path}: {exc}") from exc
        try:
            state = load_file(str(weights_path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"malformed {weights_path}: {exc}") from exc
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"weights in {weights_path} do not match the config: {exc}") from exc
        return model.to(map_location)


def _atomic_write(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then fsync and rename onto ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
