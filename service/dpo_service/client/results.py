"""What the client's calls return: the service's answers as frozen dataclasses, the same
fields and values over REST and gRPC (built from the response dict either transport yields)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

__all__ = ["CheckpointResult", "LossResult", "ModelInfo", "ModelMemory"]


@dataclass(frozen=True)
class LossResult:
    """The service's ``LossResponse`` (same fields, same values over both protocols)."""

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
    trained: bool = False
    grad_norm: float | None = None
    new_model_version: int | None = None
    request_id: str | None = None
    # composed losses (loss_type as a list) and return_token_logps=True; None otherwise
    loss_terms: dict[str, float] | None = None
    loss_weights: dict[str, float] | None = None
    chosen_token_logps: list[list[float]] | None = None
    chosen_token_ids: list[list[int]] | None = None
    rejected_token_logps: list[list[float]] | None = None
    rejected_token_ids: list[list[int]] | None = None
    # sessions (issue 12): the session the request ran on; pairs accumulated (accumulate)
    session: str | None = None
    accumulated_pairs: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossResult:
        values: dict[str, Any] = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        return cls(**values)


@dataclass(frozen=True)
class ModelMemory:
    """Bytes the server holds for its model (maps keyed by dtype name; see the README's
    Precision section for each field)."""

    weights_bytes: dict[str, int]
    master_copy_bytes: int
    optimizer_state_bytes: dict[str, int]
    optimizer_state_bytes_after_step: int
    gradient_bytes: int
    rollback_snapshot_bytes: int
    reference_bytes: dict[str, int]
    total_bytes: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMemory:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class ModelInfo:
    """The model the server holds (``GET /v1/model`` / ``GetModelInfo``), its precision
    policy (``dtype`` is the compute dtype) and the memory it takes."""

    name: str
    kind: str
    parameters: int
    vocab_size: int
    max_seq_len: int
    dtype: str
    device: str
    model_version: int
    tokenizer: str
    reference: bool
    compute_dtype: str | None = None
    param_dtype: str | None = None
    optimizer_state_dtype: str | None = None
    reduction_dtype: str | None = None
    reference_dtype: str | None = None
    autocast: bool | None = None
    loss_scale: float | None = None
    step_rollback: str | None = None
    memory: ModelMemory | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        # the precision fields (default None) are absent from a server older than them
        values: dict[str, Any] = {
            f.name: data[f.name] if f.default is MISSING else data.get(f.name) for f in fields(cls)
        }
        if values["memory"] is not None:
            values["memory"] = ModelMemory.from_dict(values["memory"])
        return cls(**values)


@dataclass(frozen=True)
class CheckpointResult:
    """A checkpoint the server wrote: the version it holds, where (server-side) and the
    SHA-256 of its weights."""

    model_version: int
    path: str | None = None
    weights_sha256: str | None = None
