"""LoRA adapters through PEFT on the sessions' one shared frozen base (issue 12).

Every session's adapter is a *named* PEFT adapter injected into the same base module
(:func:`peft.inject_adapter_in_model`, once per session: PEFT's multi-adapter layers). Outside
:func:`adapter_on` every adapter is **disabled**, so the base computes exactly what it did
before any adapter existed (PEFT's LoRA layer then calls its wrapped ``nn.Linear`` only): that
is the sessions' ``base`` reference and, when the base is the service's frozen reference copy,
still the default model's reference, bit for bit. All of it runs on the engine's one worker
thread, so switching the active adapter never races.

A LoRA layer computes ``W x + (alpha / r) · B (A x)`` (``A``: r×in, Kaiming-uniform from the
session's seed; ``B``: out×r, zeros, so a new adapter changes nothing); ``A`` and ``B`` are
float32 and the only trainable tensors of a session.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

#: Default LoRA targets: the attention and MLP projections (built-in model and Llama alike).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Modules LoRA may never target here: the log-prob head reads the LM head's weight directly
#: (chunked logsumexp, never the module), so an adapter there would be silently skipped.
FORBIDDEN_TARGETS = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class LoraSpec:
    """One session's LoRA configuration."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            init_lora_weights=True,
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoraSpec:
        return cls(
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            dropout=float(data["dropout"]),
            target_modules=tuple(str(t) for t in data["target_modules"]),
            seed=int(data["seed"]),
        )


def lora_layers(base: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in base.modules() if isinstance(m, BaseTunerLayer)]


def check_targets(base: nn.Module, spec: LoraSpec) -> None:
    """ValueError when ``spec`` targets a forbidden module or one the base does not have."""
    bad = [t for t in spec.target_modules if t in FORBIDDEN_TARGETS]
    if bad:
        raise ValueError(
            f"target_modules: {bad} cannot take LoRA here (the LM head and embeddings stay "
            "frozen; the log-prob head reads the LM head weight directly)"
        )
    names = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if _is_linear(m)}
    missing = [t for t in spec.target_modules if t not in names]
    if missing:
        raise ValueError(
            f"target_modules: {missing} name no linear layer of this model (it has {sorted(names)})"
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, BaseTunerLayer) and isinstance(module.get_base_layer(), nn.Linear)
    )


def inject(base: nn.Module, name: str, spec: LoraSpec) -> dict[str, nn.Parameter]:
    """Add adapter ``name`` to ``base`` (A from ``spec.seed``, B zero), leave every adapter
    disabled and return the new adapter's parameters by name (float32)."""
    check_targets(base, spec)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multiple adapters": exactly what is meant
        torch.manual_seed(spec.seed)
        inject_adapter_in_model(spec.peft_config(), base, adapter_name=name)
    params = adapter_parameters(base, name)
    for p in params.values():
        p.data = p.data.float()
    disable_all(base)
    return params


def adapter_parameters(base: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The LoRA tensors of adapter ``name`` (``...q_proj.lora_A.<name>.weight`` → tensor)."""
    marker = f".{name}."
    return {
        k: p
        for k, p in base.named_parameters()
        if (".lora_A" in k or ".lora_B" in k) and marker in k
    }


def remove(base: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every layer (its memory is freed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "adapter was active which is now deleted"
        for layer in lora_layers(base):
            if name in getattr(layer, "lora_A", {}):
                layer.delete_adapter(name)
    config = getattr(base, "peft_config", None)
    if isinstance(config, dict):
        config.pop(name, None)
    disable_all(base)


def disable_all(base: nn.Module) -> None:
    for layer in lora_layers(base):
        layer.enable_adapters(False)


@contextlib.contextmanager
def adapter_on(base: nn.Module, name: str) -> Iterator[None]:
    """Adapter ``name`` active on ``base`` for the block; every adapter disabled after it.
    The autograd graph built inside keeps the adapter's tensors, so ``backward`` after the
    block is exact."""
    layers = lora_layers(base)
    for layer in layers:
        layer.set_adapter(name)
        layer._disable_adapters = False
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = True


class AdapterView(nn.Module):
    """The ``CausalLM`` of one session: ``base`` with adapter ``name`` on, for
    :func:`~modern_llm.alignment.logprobs.pair_logps`. The base is not a registered submodule
    (``parameters()`` is the adapter's only); ``train()``/``eval()`` reach the base (LoRA
    dropout)."""

    def __init__(self, base: nn.Module, name: str, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "adapter", name)
        self.adapter_params = nn.ParameterList(list(params.values()))

    def hidden_states(self, input_ids: Tensor, **kwargs: Any) -> Any:
        with adapter_on(self.base, self.adapter):  # type: ignore[arg-type]
            return self.base.hidden_states(input_ids, **kwargs)  # type: ignore[operator]

    def train(self, mode: bool = True) -> AdapterView:
        self.base.train(mode)  # type: ignore[union-attr]
        return super().train(mode)

    @property
    def lm_head_weight(self) -> Tensor:
        weight: Tensor = self.base.lm_head_weight  # type: ignore[assignment]
        return weight

    def __getattr__(self, item: str) -> Any:
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(object.__getattribute__(self, "base"), item)


@dataclass
class PeftExport:
    """An adapter in PEFT's own format: its ``LoraConfig`` (saved as
    ``adapter_config.json``) and the tensors of ``adapter_model.safetensors`` (keys as
    ``PeftModel.save_pretrained`` writes them)."""

    config: LoraConfig
    tensors: dict[str, Tensor] = field(default_factory=dict)


def peft_export(
    base: nn.Module, name: str, spec: LoraSpec, *, prefix: str, base_model_name: str | None
) -> PeftExport:
    """Adapter ``name`` as PEFT saves it. ``prefix``: the part of the parameter names that
    is ours, not the Hugging Face model's (``model.`` for :class:`HFCausalLM`, empty for the
    built-in model); keys become ``base_model.model.<hf name>.lora_A.weight``."""
    tensors: dict[str, Tensor] = {}
    marker = f".{name}."
    for key, p in adapter_parameters(base, name).items():
        plain = key.replace(marker, ".")
        if prefix and plain.startswith(prefix):
            plain = plain[len(prefix) :]
        tensors[f"base_model.model.{plain}"] = p.detach().to("cpu", torch.float32).contiguous()
    config = spec.peft_config()
    config.base_model_name_or_path = base_model_name
    config.task_type = "CAUSAL_LM" if prefix else None
    config.inference_mode = True
    return PeftExport(config=config, tensors=tensors)
