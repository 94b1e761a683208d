"""Loss-only work of a coalesced batch: one inference pass, each request gets its own rows.

Shared by the default model (:meth:`Engine._run_default`) and the LoRA sessions
(:func:`dpo_service.engine.sessions.training.session_losses`): the same forward, the same
reference path (through the reference log-prob cache when one is bound) and the same per-request
results; only the model, its reference and its version differ.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import torch

from dpo_service.engine.forward import forward_logps
from dpo_service.engine.losses import compute_loss, preference_inputs, rows_of
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.reference_lookup import reference_logps
from dpo_service.engine.results import LossResult, result_from
from dpo_service.errors import ServiceError
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import CausalLM, SequenceLogps

__all__ = ["batch_losses"]


def batch_losses(
    model: CausalLM,
    reference: CausalLM | None,
    requests: Sequence[PreparedRequest],
    settings: Settings,
    bundle: ModelBundle,
    version: int,
) -> list[LossResult | BaseException]:
    """Loss-only results of ``requests`` under ``model`` at model ``version``, in order; a
    request whose loss cannot be formed gets its :class:`ServiceError` in its place."""
    pairs = [p for r in requests for p in r.pairs]
    with torch.inference_mode():
        tokens = any(r.return_token_logps for r in requests)
        policy = forward_logps(model, pairs, settings, bundle, return_token_logps=tokens)
        ref_logps = None
        if any(r.reference == "frozen" for r in requests):
            assert reference is not None, "prepare() admits frozen only with a reference"
            ref_logps = reference_logps(reference, pairs, settings, bundle)
    results: list[LossResult | BaseException] = []
    start = 0
    for request in requests:
        rows = slice(start, start + request.num_pairs)
        start = rows.stop
        try:
            results.append(_result_of_rows(request, policy, ref_logps, rows, version))
        except ServiceError as exc:
            results.append(exc)
    return results


def _result_of_rows(
    request: PreparedRequest,
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    rows: slice,
    version: int,
) -> LossResult:
    """The result for the ``rows`` of the batch that belong to ``request``."""
    mine = rows_of(policy, rows)
    ref = None if reference is None else rows_of(reference, rows)
    inputs = preference_inputs(request, mine, ref, range(request.num_pairs))
    out = compute_loss(request, inputs, mine)
    return result_from(request, inputs, out, version, request.request_id or uuid.uuid4().hex)
