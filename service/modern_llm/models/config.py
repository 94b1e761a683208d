"""Configuration of :class:`modern_llm.models.transformer.ModernDecoderLM`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["ModernDecoderConfig"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModernDecoderConfig:
    """Hyper-parameters of :class:`ModernDecoderLM` (JSON-serialisable)."""

    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_hidden: int | None = None  # None: SwiGLU 8/3·d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        ints = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
        for name in ints + (("ffn_hidden",) if self.ffn_hidden is not None else ()):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            _require(ok, f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            _require(ok, f"{name} must be a positive number, got {value!r}")
        _require(isinstance(self.tie_embeddings, bool), "tie_embeddings must be a bool")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed: int")
        _require(self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads")
        _require(self.n_heads % self.n_kv_heads == 0, "n_heads must be divisible by n_kv_heads")
        _require(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Resolved SwiGLU hidden width."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return -(-8 * self.d_model // (3 * 64)) * 64

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (what ``config.json`` holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModernDecoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**data)
