"""The model bundle the engine holds: the model, its tokenizer adapter and metadata, and the
tokenizer protocol (with the byte tokenizer's adapter for the built-in model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from modern_llm.alignment.logprobs import CausalLM, PairTokens
from modern_llm.tokenizer import ByteTokenizer


class TripleTokenizer(Protocol):
    """Turns text triples into token ids the way the model was trained to see them."""

    name: str
    vocab_size: int
    pad_id: int

    def encode_triple(self, prompt: str, chosen: str, rejected: str) -> PairTokens: ...


class ByteTripleTokenizer:
    """TRL-style layout with the byte tokenizer: ``[BOS] prompt`` then ``response [EOS]``."""

    def __init__(self) -> None:
        self.inner = ByteTokenizer()
        self.name = self.inner.name
        self.vocab_size = self.inner.vocab_size
        self.pad_id = self.inner.pad_id

    def encode_triple(self, prompt: str, chosen: str, rejected: str) -> PairTokens:
        return PairTokens(
            prompt=self.inner.encode(prompt, add_bos=True),
            chosen=self.inner.encode(chosen, add_eos=True) if chosen else [],
            rejected=self.inner.encode(rejected, add_eos=True) if rejected else [],
        )


@dataclass
class ModelBundle:
    """What the engine owns."""

    model: torch.nn.Module
    tokenizer: TripleTokenizer
    name: str
    kind: str
    vocab_size: int
    max_seq_len: int
    # False when the model cannot take an explicit attention mask: the engine then lays pairs
    # out as TWO_ROWS instead of SHARED_PREFIX.
    supports_custom_mask: bool = True
    # What a checkpoint records as the model's architecture, checked at resume (None: the
    # model's ``config.to_dict()``, as for the built-in model). Hugging Face bundles set
    # architecture, sizes, vocabulary and a digest of the tensor names and shapes.
    identity: dict[str, Any] | None = None

    @property
    def causal_lm(self) -> CausalLM:
        return self.model  # type: ignore[return-value]
