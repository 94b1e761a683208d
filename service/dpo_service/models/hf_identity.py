"""What a checkpoint of a Hugging Face model records as its identity (issue 10, item 5).

A checkpoint is resumed only onto the model and tokenizer it was written for. For a
``transformers`` model that identity is:

- the architecture and sizes from ``config.json`` (:data:`CONFIG_KEYS`, the ones present),
- the number of parameters and a sha256 of every tensor's name and shape (so two models
  whose config keys happen to agree but whose weights would not load are still told apart),
- the tokenizer's vocabulary: a sha256 of its token → id map and special-token ids
  (:func:`vocab_sha256`), and its size.

Only these are compared, not the whole ``config.json``: keys a newer ``transformers`` adds
with defaults, or ones that only shape the run (``use_cache``, ``dtype``), must not stop a
resume.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

CONFIG_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
)


def model_identity(config: Any, model: nn.Module) -> dict[str, Any]:
    """Architecture, sizes and tensor-shape digest of a loaded HF model."""
    values = config.to_dict() if callable(getattr(config, "to_dict", None)) else {}
    identity: dict[str, Any] = {
        key: json.loads(json.dumps(values[key], default=str))
        for key in CONFIG_KEYS
        if key in values
    }
    state = model.state_dict()
    shapes = hashlib.sha256()
    for name in sorted(state):
        shapes.update(f"{name}|{tuple(state[name].shape)}\n".encode())
    identity["kind"] = "hf"
    identity["parameters"] = sum(p.numel() for p in model.parameters())
    identity["tensor_shapes_sha256"] = shapes.hexdigest()
    return identity


def vocab_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id, added tokens included) and its
    special-token ids: equal iff the same text becomes the same ids."""
    vocab = sorted((str(k), int(v)) for k, v in tokenizer.get_vocab().items())
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    body = json.dumps({"vocab": vocab, "special": special}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()
