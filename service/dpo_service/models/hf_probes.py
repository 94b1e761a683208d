"""Load-time probes: does a ``transformers`` model behave exactly as each fast path assumes?

The service runs a Hugging Face model through :class:`~dpo_service.models.hf.HFCausalLM`, which
takes shortcuts the stock ``model(input_ids).logits`` does not: the LM head applied by the
service, an explicit 4D "may attend" mask with explicit positions (``SHARED_PREFIX``) and a KV
cache reused by several rows (``PREFIX_CACHE``). Each probe runs a few tokens both ways and
turns a path on only when the results agree (within the dtype's tolerance) **and** the check
could have failed: a wrong mask or an ignored cache must change the result by much more than
the error, so an architecture that silently ignores the mask or the cache is caught instead of
being trusted. A path whose probe fails is simply not used (two rows, no prefix cache).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modern_llm.alignment.logprobs import shared_prefix_mask

__all__ = ["MASK_STYLES", "check_lm_head", "probe_custom_mask", "probe_prefix_cache"]

log = logging.getLogger(__name__)

# Config attributes of architectures whose logits are not ``lm_head(final hidden state)``.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
MASK_STYLES = ("additive", "bool")


def rel_err(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-6))


def tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 or dtype == torch.float64 else 5e-2


def _probe_ids(vocab: int, n: int, device: torch.device) -> Tensor:
    return torch.tensor([(7 * i + 3) % vocab for i in range(n)], device=device)[None]


@torch.no_grad()
def check_lm_head(adapter: Any) -> None:
    """Raise ``ValueError`` unless ``lm_head(hidden_states(x))`` equals the model's logits."""
    config = getattr(adapter.model, "config", None)
    for attr in LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            raise ValueError(
                f"{type(adapter.model).__name__} transforms its logits ({attr}={value}); "
                "the response-only LM head does not support that architecture"
            )
    weight = adapter.lm_head_weight
    ids = _probe_ids(weight.shape[0], 8, weight.device)
    expected = adapter(ids)
    got = F.linear(adapter.hidden_states(ids), weight, adapter.lm_head_bias)
    err = rel_err(got, expected)
    if not err <= tolerance(weight.dtype):
        raise ValueError(
            f"{type(adapter.model).__name__}: logits differ from lm_head(final hidden state) "
            f"(relative error {err:.3g}); this architecture is not supported"
        )


@torch.no_grad()
def probe_custom_mask(adapter: Any) -> str | None:
    """The mask style under which the shared-prefix layout matches separate rows, or ``None``.

    Runs ``[prompt][rejected]`` on its own (truth), ``[prompt][chosen][rejected]`` with the
    shared-prefix mask and positions (must match the truth at the rejected tokens) and the same
    row with a plain causal 4D mask (rejected sees chosen: must differ, so a mask that is
    silently ignored is caught).
    """
    weight = adapter.lm_head_weight
    ids = _probe_ids(weight.shape[0], 9, weight.device)  # prompt 0..2, chosen 3..5, rejected 6..8
    p, c, r = ids[:, :3], ids[:, 3:6], ids[:, 6:]
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5]], device=weight.device)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]], device=weight.device)
    shared = shared_prefix_mask(segments)  # (1, 9, 9)
    causal = torch.ones(9, 9, dtype=torch.bool, device=weight.device).tril()[None]
    truth = adapter.hidden_states(torch.cat([p, r], dim=1))[:, 3:]
    row = torch.cat([p, c, r], dim=1)
    original = adapter.mask_style
    for style in MASK_STYLES:
        adapter.mask_style = style
        try:
            masked = adapter.hidden_states(row, position_ids=pos, attn_mask=shared)[:, 6:]
            leaky = adapter.hidden_states(row, position_ids=pos, attn_mask=causal)[:, 6:]
        except Exception as exc:  # an architecture that rejects 4D masks or position_ids
            log.info("4D mask style %r not accepted: %s", style, exc)
            continue
        err, leak = rel_err(masked, truth), rel_err(leaky, truth)
        if err <= tolerance(weight.dtype) and err < 0.25 * leak:
            adapter.mask_style = style
            return style
        log.info("4D mask style %r: error %.3g vs leak %.3g", style, err, leak)
    adapter.mask_style = original
    return None


# Probe pairs for the prefix cache: prompts of different lengths (the shorter one is padded in
# the prompt pass, so its cache holds pad keys the responses must not see) and responses of
# different lengths (padded in the response pass).
_PROMPT_LENS = (4, 2)
_RESPONSE_LENS = (3, 2, 2, 1)  # slot s: pair s % 2, chosen for s < 2, rejected after


def _cached_responses(
    adapter: Any, prompts: list[Tensor], responses: list[Tensor], *, see_pads: bool
) -> list[Tensor]:
    """Hidden states of every response row run against the tiled cache of the prompt pass
    (``see_pads``: a deliberately wrong mask that also shows the prompt pads)."""
    dev, b = prompts[0].device, len(prompts)
    plens = torch.tensor([len(p) for p in prompts] * 2, device=dev)[:, None]  # (2B, 1)
    pmax, width = int(plens.max()), max(len(r) for r in responses)
    padded = torch.stack([F.pad(p, (0, pmax - len(p))) for p in prompts])  # (B, Pmax)
    _, cache = adapter.hidden_states(padded, use_cache=True)
    ids = torch.stack([F.pad(r, (0, width - len(r))) for r in responses])  # (2B, W)
    q = torch.arange(width, device=dev)
    keys = torch.arange(pmax, device=dev)[None, None, :] < (pmax if see_pads else plens[:, :, None])
    own = (q[None, :] <= q[:, None])[None]
    mask = torch.cat((keys.expand(2 * b, width, pmax), own.expand(2 * b, width, width)), -1)
    hidden = adapter.hidden_states(
        ids, position_ids=plens + q[None, :], attn_mask=mask, past_key_values=cache
    )
    return [hidden[s, : len(r)] for s, r in enumerate(responses)]


def _positions(start: int, ids: Tensor) -> Tensor:
    return start + torch.arange(len(ids), device=ids.device)[None]  # (1, T)


@torch.no_grad()
def probe_prefix_cache(adapter: Any) -> bool:
    """Whether ``PREFIX_CACHE`` (the prompts once with a KV cache, then every response row
    attending to its pair's cached prompt) gives the hidden states of separate rows.

    Must match ``[prompt][response]`` run on its own, and must differ both when the responses
    see the prompt pads (the mask is honoured with a cache) and when they run without the cache
    (the cache is used). Sets and returns ``adapter.supports_prefix_cache``.
    """
    weight = adapter.lm_head_weight
    ids = _probe_ids(weight.shape[0], sum(_PROMPT_LENS) + sum(_RESPONSE_LENS), weight.device)[0]
    parts = list(ids.split([*_PROMPT_LENS, *_RESPONSE_LENS]))
    prompts, responses = parts[:2], parts[2:]
    adapter.supports_prefix_cache = True
    try:
        truth = [
            adapter.hidden_states(torch.cat([prompts[s % 2], r])[None])[0, -len(r) :]
            for s, r in enumerate(responses)
        ]
        got = _cached_responses(adapter, prompts, responses, see_pads=False)
        leaky = _cached_responses(adapter, prompts, responses, see_pads=True)
        alone = [  # the responses at their positions, without the prompt
            adapter.hidden_states(r[None], position_ids=_positions(len(prompts[s % 2]), r))[0]
            for s, r in enumerate(responses)
        ]
    except Exception as exc:  # an architecture whose cache or 4D mask does not fit
        log.info("prefix cache not accepted: %s", exc)
        adapter.supports_prefix_cache = False
        return False
    err = max(rel_err(g, t) for g, t in zip(got, truth, strict=True))
    leak = max(rel_err(g, t) for g, t in zip(leaky, truth, strict=True))
    ignored = max(rel_err(g, t) for g, t in zip(alone, truth, strict=True))
    ok = err <= tolerance(weight.dtype) and err < 0.25 * min(leak, ignored)
    if not ok:
        log.info("prefix cache: error %.3g vs leak %.3g, no cache %.3g", err, leak, ignored)
    adapter.supports_prefix_cache = ok
    return ok
