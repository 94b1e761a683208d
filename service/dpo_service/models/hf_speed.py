"""The speed paths of :class:`~dpo_service.models.hf.HFCausalLM`: fused norms and KV caches.

**Fused RMSNorm.** Llama-family RMSNorms (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``, ...) compute
``weight * x * rsqrt(mean(x²) + eps)`` in float32 as five or six separate element-wise kernels
(and as many saved activations when training). :class:`FusedRMSNorm` computes the same with
PyTorch's fused ``rms_norm`` kernel when input and weight are float32 (or float64), as the
built-in model's ``RMSNorm`` does, and with the Llama formula otherwise. It holds the **same**
``weight`` Parameter under the same name, so ``state_dict`` keys, checkpoints, the optimizer
and the checkpoint identity are unchanged.

:func:`fuse_rms_norms` replaces a module only after checking, on a random input and a random
weight, that the fused form gives the module's own output (float32, and bfloat16 inputs), so an
architecture whose norm merely looks alike (``(1 + weight)`` scaling, another epsilon placement)
keeps its own module. :func:`restore_modules` puts the originals back.

**Prefix KV cache.** ``HFCausalLM.hidden_states(..., use_cache=True)`` returns the cache as one
``(key, value)`` pair per layer (:data:`KVCache`, as the built-in model does), read out of the
``transformers`` cache object by :func:`kv_pairs`; a later call hands it back and
:func:`tiled_cache` rebuilds a ``DynamicCache`` whose row ``i`` continues cached row
``i mod B'`` (one cached prompt shared by its chosen and its rejected row).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "FusedRMSNorm",
    "KVCache",
    "fuse_rms_norms",
    "kv_pairs",
    "restore_modules",
    "tiled_cache",
]

#: One ``(key, value)`` pair per layer, each (B, n_kv_heads, S, head_dim).
KVCache = list[tuple[Tensor, Tensor]]

_EXACT = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-3}


class FusedRMSNorm(nn.Module):
    """Llama's RMSNorm with the fused kernel for float32/float64 (same ``weight`` Parameter)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.weight = original.weight  # the same Parameter object: "….weight" as before
        self.variance_epsilon = float(original.variance_epsilon)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        assert isinstance(weight, Tensor)
        if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, (x.shape[-1],), weight, self.variance_epsilon)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return weight * h.to(x.dtype)


def _looks_like_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and not any(True for _ in module.children())
        and [name for name, _ in module.named_parameters()] == ["weight"]
    )


@torch.no_grad()
def _same_function(original: nn.Module, fused: FusedRMSNorm) -> bool:
    """Both modules agree on random inputs with a random weight (not the all-ones init, which
    would hide a missing or shifted scale), in the weight's dtype and in bfloat16."""
    weight: Tensor = original.weight  # type: ignore[assignment]
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.rand(weight.shape, generator=gen) + 0.5).to(weight.device, weight.dtype)
    x = (torch.randn(3, 5, weight.shape[0], generator=gen) * 3).to(weight.device)
    for dtype in dict.fromkeys((weight.dtype, torch.bfloat16)):
        xd = x.to(dtype)
        want = functional_call(original, {"weight": w}, (xd,))
        got = functional_call(fused, {"weight": w}, (xd,))
        tol = _EXACT.get(want.dtype, 1e-2) * float(want.float().abs().max()) + 1e-6
        if want.dtype != got.dtype or not float((want.float() - got.float()).abs().max()) <= tol:
            return False
    return True


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def fuse_rms_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every Llama-style RMSNorm of ``model`` that :class:`FusedRMSNorm` reproduces;
    returns the replaced originals by qualified name (for :func:`restore_modules`)."""
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if name and _looks_like_rms_norm(module):
            fused = FusedRMSNorm(module)
            if _same_function(module, fused):
                _set(model, name, fused)
                replaced[name] = module
    return replaced


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the modules :func:`fuse_rms_norms` replaced."""
    for name, module in originals.items():
        _set(model, name, module)


# ------------------------------------------------------------------------------ KV cache


def kv_pairs(cache: Any) -> KVCache:
    """The per-layer key/value tensors of a ``transformers`` cache object."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: a list of cache layers
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def tiled_cache(past: KVCache, batch: int) -> Any:
    """A ``DynamicCache`` whose row i holds ``past`` row i mod B' (one copy per layer)."""
    from transformers import DynamicCache

    rows = past[0][0].shape[0]
    if batch % rows != 0:
        raise ValueError(f"past_key_values batch {rows} must divide the input batch {batch}")
    cache = DynamicCache()
    for i, (key, value) in enumerate(past):
        if batch != rows:
            key, value = key.repeat(batch // rows, 1, 1, 1), value.repeat(batch // rows, 1, 1, 1)
        cache.update(key, value, i)
    return cache
