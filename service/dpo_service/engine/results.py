"""What the engine answers: :class:`LossResult`, a plain dataclass (no wire types).

The API layer turns a result into its protocol's response (``LossResponse`` JSON, the
``ComputeLossResponse`` proto). Results of train steps are remembered for idempotent retries
and persisted in checkpoints as a versioned JSON object (:meth:`LossResult.to_json`), so a
change of the wire schema can never break resuming a checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_service.engine.precision import MemoryReport
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.errors import ErrorCode, ServiceError
from modern_llm.alignment.dpo_loss import LossOutput, PreferenceLogps, dpo_metrics

#: Version of the persisted JSON of a :class:`LossResult` (``{"schema": N, ...}``).
RESULT_SCHEMA = 1


class UnknownResultSchema(ValueError):
    """A persisted result written by a format this version cannot read."""


@dataclass(frozen=True)
class LossResult:
    """One request's loss and per-pair statistics (see ``schemas.LossResponse`` for the
    meaning of each field; the names are the same)."""

    loss: float
    losses: list[float]
    chosen_logps: list[float]
    rejected_logps: list[float]
    reference_chosen_logps: list[float] | None
    reference_rejected_logps: list[float] | None
    rewards_chosen: list[float]
    rewards_rejected: list[float]
    margins: list[float]
    accuracy: float
    chosen_tokens: list[int]
    rejected_tokens: list[int]
    num_tokens: int
    metrics: dict[str, float]
    loss_type: str
    beta: float
    model_version: int
    request_id: str
    trained: bool = False
    grad_norm: float | None = None
    new_model_version: int | None = None
    # issue 14: a composed loss's terms (batch means, unweighted) and weights; per-token
    # log-probs and token ids of the responses (return_token_logps)
    loss_terms: dict[str, float] | None = None
    loss_weights: dict[str, float] | None = None
    chosen_token_logps: list[list[float]] | None = None
    chosen_token_ids: list[list[int]] | None = None
    rejected_token_logps: list[list[float]] | None = None
    rejected_token_ids: list[list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for later fields

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (``extra`` left out): the REST body's shape."""
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    def trained_as(self, *, grad_norm: float, new_version: int) -> LossResult:
        return dataclasses.replace(
            self, trained=True, grad_norm=grad_norm, new_model_version=new_version
        )

    def to_json(self) -> dict[str, Any]:
        """Versioned JSON for persistence (checkpoints' idempotency record)."""
        return {"schema": RESULT_SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> LossResult:
        """Inverse of :meth:`to_json`; unknown keys of the same schema are ignored.

        Raises :class:`UnknownResultSchema` for another schema version (or none: entries
        written before the schema existed) and ``ValueError``/``TypeError`` for a malformed one.
        """
        if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise UnknownResultSchema(f"result schema {found!r}, expected {RESULT_SCHEMA}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(x) for x in t.detach().float().cpu().tolist()]


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(x) for x in t.tolist()]


def all_finite(out: LossOutput) -> bool:
    """Whether the loss and every per-pair statistic are finite numbers."""
    tensors = (out.loss, out.losses, out.rewards_chosen, out.rewards_rejected, out.margins)
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def _request_extras(request: PreparedRequest, out: LossOutput) -> dict[str, Any]:
    """The fields a request asked for besides the loss: composed terms, token log-probs."""
    extras: dict[str, Any] = {}
    terms = getattr(out, "term_losses", None)
    if request.composed is not None and terms:
        extras["loss_terms"] = {k: float(v.detach().double().mean()) for k, v in terms.items()}
        extras["loss_weights"] = dict(getattr(out, "weights", {}))
    chosen = getattr(out, "chosen_token_logps", None)
    rejected = getattr(out, "rejected_token_logps", None)
    if request.return_token_logps and chosen is not None and rejected is not None:
        extras["chosen_token_logps"] = [_floats(t) or [] for t in chosen]
        extras["rejected_token_logps"] = [_floats(t) or [] for t in rejected]
        extras["chosen_token_ids"] = [list(p.chosen) for p in request.pairs]
        extras["rejected_token_ids"] = [list(p.rejected) for p in request.pairs]
    return extras


def result_from(
    request: PreparedRequest,
    inputs: PreferenceLogps,
    out: LossOutput,
    version: int,
    request_id: str,
) -> LossResult:
    """Assemble the result of ``request`` from its loss inputs and output (all on one
    device); 422 when a statistic is not finite."""
    if not all_finite(out):
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT,
            "the loss or rewards are not finite for this input (beta or reference log-probs "
            "too large?)",
        )
    extras = _request_extras(request, out)
    metrics = dpo_metrics(out, inputs)
    for name, value in (extras.get("loss_terms") or {}).items():
        metrics[f"loss/{name}"] = value  # as TRL's composed_metrics
    return LossResult(
        loss=float(out.loss.detach()),
        losses=_floats(out.losses) or [],
        chosen_logps=_floats(inputs.policy_chosen) or [],
        rejected_logps=_floats(inputs.policy_rejected) or [],
        reference_chosen_logps=_floats(inputs.reference_chosen),
        reference_rejected_logps=_floats(inputs.reference_rejected),
        rewards_chosen=_floats(out.rewards_chosen) or [],
        rewards_rejected=_floats(out.rewards_rejected) or [],
        margins=_floats(out.margins) or [],
        accuracy=float(out.accuracies.float().mean()),
        chosen_tokens=_ints(inputs.chosen_lengths),
        rejected_tokens=_ints(inputs.rejected_lengths),
        num_tokens=request.num_tokens,
        metrics=metrics,
        loss_type=request.loss.loss_type.value,
        beta=request.loss.beta,
        model_version=version,
        request_id=request_id,
        **extras,
    )


@dataclass(frozen=True)
class EngineInfo:
    """What the engine holds (``schemas.ModelInfo`` has the same fields): the model, and the
    precision policy with the memory it takes (:mod:`dpo_service.engine.precision`)."""

    name: str
    kind: str
    parameters: int
    vocab_size: int
    max_seq_len: int
    dtype: str  # DPO_DTYPE, the compute dtype (= compute_dtype)
    device: str
    model_version: int
    tokenizer: str
    reference: bool
    compute_dtype: str
    param_dtype: str
    optimizer_state_dtype: str
    reduction_dtype: str
    reference_dtype: str | None
    autocast: bool
    loss_scale: float | None
    step_rollback: str
    memory: MemoryReport

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
