"""Loads the model bundle the engine holds (:class:`~dpo_service.models.bundle.ModelBundle`).

``DPO_MODEL`` selects the source:

- ``builtin``: a seeded :class:`ModernDecoderLM` sized by the ``DPO_BUILTIN_*`` settings, with
  the byte tokenizer (no files needed);
- a directory written by ``ModernDecoderLM.save_pretrained`` (config.json + model.safetensors),
  also with the byte tokenizer;
- ``hf:/path``: a local transformers causal LM (see :mod:`dpo_service.models.hf`).

Parameters are always loaded as float32 (:data:`PARAM_DTYPE`, the master weights the
optimizer updates); ``DPO_DTYPE`` is the compute dtype the engine runs the passes in under
autocast (``dpo_service.engine.precision``), checked here against the device.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpo_service.models.bundle import ByteTripleTokenizer, ModelBundle
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM
from modern_llm.tokenizer import ByteTokenizer


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DPO_DEVICE={name} but CUDA is not available")
    return device


#: Dtype of the loaded parameters (float32 master weights, whatever the compute dtype).
PARAM_DTYPE = torch.float32


def resolve_dtype(name: str) -> torch.dtype:
    """``DPO_DTYPE`` (the compute dtype) as a torch dtype."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_compute_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """``ValueError`` when ``device`` cannot autocast to ``dtype`` (float32 always works)."""
    if dtype == torch.float32:
        return
    name = str(dtype).removeprefix("torch.")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"compute dtype {name} is not supported (float32, bfloat16, float16)")
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"DPO_DTYPE={name}: autocast is not available on {device}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"DPO_DTYPE=bfloat16 but {device} does not support bfloat16")


def builtin_config(
    *, d_model: int, layers: int, heads: int, kv_heads: int, max_seq_len: int, seed: int
) -> ModernDecoderConfig:
    """The built-in model's config: byte vocabulary, the given sizes."""
    return ModernDecoderConfig(
        vocab_size=ByteTokenizer.vocab_size,
        d_model=d_model,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        max_seq_len=max_seq_len,
        seed=seed,
    )


def load_bundle(
    source: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    builtin: ModernDecoderConfig,
) -> ModelBundle:
    """Load the model named by ``source`` onto ``device`` with float32 parameters; ``dtype``
    is the compute dtype (``DPO_DTYPE``), refused here when ``device`` cannot autocast to it."""
    check_compute_dtype(device, dtype)
    if source.startswith("hf:"):
        from dpo_service.models.hf import load_hf_bundle

        return load_hf_bundle(Path(source[3:]), device=device, dtype=PARAM_DTYPE)
    if source == "builtin":
        model = ModernDecoderLM(builtin)
        name, kind = f"builtin-modern-decoder-{model.num_parameters() / 1e6:.1f}M", "builtin"
    else:
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        model = ModernDecoderLM.from_pretrained(path)
        name, kind = path.name, "modern_llm"
    tokenizer = ByteTripleTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocab {model.config.vocab_size} is smaller than the byte tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    model.to(device=device, dtype=PARAM_DTYPE)
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        name=name,
        kind=kind,
        vocab_size=model.config.vocab_size,
        max_seq_len=model.config.max_seq_len,
    )
