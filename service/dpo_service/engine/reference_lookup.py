"""Frozen-reference log-probs through the persistent cache (:mod:`dpo_service.state.reference_cache`).

:func:`reference_logps` replaces ``forward_logps(state.reference, ...)`` at both call sites
(loss-only batches in :mod:`dpo_service.engine.engine`, train micro-batches in
:mod:`dpo_service.engine.train_step`). It looks up the chosen and rejected sequence of every
pair; the reference pass runs only on the pairs with a miss (one sub-batch), their values are
written back and merged with the hits. A stored value is returned bit for bit (float32 →
float64 on disk → float32). With no cache bound to the model it is exactly ``forward_logps``.

The cache is bound to the reference *model object* (:func:`bind`), whose identity
(:func:`weights_digest` + compute dtype + device type + kind) is computed once at load. Runs on
the engine's worker thread only (the SQLite I/O included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Sequence

import torch

from dpo_service.engine.events import EngineEvents
from dpo_service.engine.forward import forward_logps
from dpo_service.engine.precision import compute_dtype_of, dtype_name
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings
from dpo_service.state.files import tokenizer_identity
from dpo_service.state.reference_cache import (
    CacheEvents,
    ReferenceCache,
    reference_identity,
    sequence_key,
)
from modern_llm.alignment.logprobs import CausalLM, PairTokens, SequenceLogps

log = logging.getLogger(__name__)

_BOUND: weakref.WeakKeyDictionary[torch.nn.Module, ReferenceLookup] = weakref.WeakKeyDictionary()


def weights_digest(model: torch.nn.Module) -> str:
    """blake2b-256 of every tensor of ``model``'s ``state_dict``: name, dtype, shape and raw
    bytes, in name order (so a copy stored in bfloat16 has another digest than its float32
    original)."""
    h = hashlib.blake2b(digest_size=32, person=b"dpo-ref-weights")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Metrics(CacheEvents):
    """Cache counters → the engine's Prometheus metrics."""

    def __init__(self, events: EngineEvents) -> None:
        self.events = events

    def on_hits(self, n: int) -> None:
        self.events.on_reference_cache("hits", n)

    def on_misses(self, n: int) -> None:
        self.events.on_reference_cache("misses", n)

    def on_error(self, what: str) -> None:
        self.events.on_reference_cache_error(what)

    def on_evicted(self, n: int) -> None:
        self.events.on_reference_cache("evictions", n)

    def on_size(self, entries: int, size_bytes: int) -> None:
        self.events.on_reference_cache_size(entries, size_bytes)


class ReferenceLookup:
    """The cache plus the identity of one reference and of the tokenizer."""

    def __init__(self, cache: ReferenceCache, identity: str, tokenizer: str) -> None:
        self.cache = cache
        self.identity = identity
        self.tokenizer = tokenizer

    def keys(self, pairs: Sequence[PairTokens]) -> list[bytes]:
        """Chosen then rejected key of every pair: ``[c0, r0, c1, r1, ...]``."""
        out = []
        for p in pairs:
            out.append(sequence_key(self.identity, self.tokenizer, p.prompt, p.chosen))
            out.append(sequence_key(self.identity, self.tokenizer, p.prompt, p.rejected))
        return out

    def logps(
        self, model: CausalLM, pairs: Sequence[PairTokens], settings: Settings, bundle: ModelBundle
    ) -> SequenceLogps:
        """Cached where stored, the reference pass on the pairs with a miss, written back."""
        keys = self.keys(pairs)
        stored = self.cache.get_many(keys)
        values = [(v.logp, v.tokens) if v is not None else None for v in stored]
        missing = [
            i for i in range(len(pairs)) if values[2 * i] is None or values[2 * i + 1] is None
        ]
        if missing:
            fresh = forward_logps(model, [pairs[i] for i in missing], settings, bundle)
            new: list[tuple[bytes, float, int]] = []
            got = [fresh.chosen.tolist(), fresh.chosen_tokens.tolist()]
            got += [fresh.rejected.tolist(), fresh.rejected_tokens.tolist()]
            for k, i in enumerate(missing):
                computed = ((got[0][k], got[1][k]), (got[2][k], got[3][k]))
                for side in (0, 1):
                    if values[2 * i + side] is None:
                        values[2 * i + side] = computed[side]
                        new.append((keys[2 * i + side], *computed[side]))
            self.cache.put_many(new)
        return _as_logps(values, model.lm_head_weight.device)

    def close(self) -> None:
        self.cache.close()


def _as_logps(values: list[tuple[float, int] | None], device: torch.device) -> SequenceLogps:
    assert all(v is not None for v in values)
    logp = torch.tensor([v[0] for v in values if v is not None], dtype=torch.float32)
    tokens = torch.tensor([v[1] for v in values if v is not None], dtype=torch.long)
    return SequenceLogps(
        chosen=logp[0::2].contiguous().to(device),
        rejected=logp[1::2].contiguous().to(device),
        chosen_tokens=tokens[0::2].contiguous().to(device),
        rejected_tokens=tokens[1::2].contiguous().to(device),
    )


def reference_logps(
    model: CausalLM, pairs: Sequence[PairTokens], settings: Settings, bundle: ModelBundle
) -> SequenceLogps:
    """The reference's log-probs of ``pairs``: through the cache bound to ``model``, if
    any, else :func:`forward_logps`. Call under ``inference_mode``."""
    lookup = _BOUND.get(model)  # type: ignore[call-overload]
    if lookup is None or not lookup.cache.enabled or not pairs:
        return forward_logps(model, pairs, settings, bundle)
    return lookup.logps(model, pairs, settings, bundle)


def bind(model: CausalLM, lookup: ReferenceLookup) -> None:
    """Route :func:`reference_logps` of ``model`` through ``lookup``."""
    _BOUND[model] = lookup  # type: ignore[index]


def open_reference_lookup(
    settings: Settings,
    reference: CausalLM | None,
    bundle: ModelBundle,
    events: EngineEvents,
    *,
    kind: str = "frozen",
) -> ReferenceLookup | None:
    """Open the cache for ``reference`` (None: no reference or no cache configured), compute
    its identity once and bind it. ``kind``: ``frozen`` (the service's initial-weights copy);
    another reference (e.g. a LoRA base with its adapter off) passes its own marker."""
    path = settings.reference_cache_path
    if reference is None or path is None:
        return None
    module: torch.nn.Module = reference  # type: ignore[assignment]
    device = next(module.parameters()).device
    identity = reference_identity(
        weights_digest(module),
        kind=kind,
        compute_dtype=dtype_name(compute_dtype_of(settings.dtype)),
        device_type=device.type,
    )
    tokenizer = json.dumps(tokenizer_identity(bundle.tokenizer), sort_keys=True)
    cache = ReferenceCache(
        path, max_entries=settings.reference_cache_max_entries, events=_Metrics(events)
    )
    lookup = ReferenceLookup(cache, identity, tokenizer)
    bind(reference, lookup)
    log.info("reference cache %s for %s", path, identity)
    return lookup
