"""Wire models of the sessions API (issue 12): ``/v1/sessions`` (REST) and the
``dpo.v1.SessionService`` messages carry the same fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from dpo_service.schemas import REQUEST_ID_PATTERN, FiniteFloat
from modern_llm.alignment.dpo_loss import LossType

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraOptions(_Strict):
    """LoRA configuration of a session (PEFT ``LoraConfig``)."""

    rank: StrictInt = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: FiniteFloat = Field(16.0, gt=0, description="LoRA alpha; the update is scaled alpha/r.")
    dropout: FiniteFloat = Field(0.0, ge=0, lt=1, description="LoRA dropout (training only).")
    target_modules: list[StrictStr] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        max_length=32,
        description="Linear layers (by name) that get an adapter: the attention and MLP "
        "projections by default; the LM head and embeddings stay frozen.",
    )
    seed: StrictInt = Field(0, ge=0, description="Seed of the adapter's initialisation (A).")


class OptimizerOptions(_Strict):
    """AdamW settings of a session (float32 state)."""

    lr: FiniteFloat = Field(1e-4, gt=0, description="Learning rate.")
    betas: tuple[FiniteFloat, FiniteFloat] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: FiniteFloat = Field(0.0, ge=0, description="Decoupled weight decay.")
    grad_clip: FiniteFloat = Field(1.0, gt=0, description="Gradient clipping (L2 norm).")


class SessionCreate(_Strict):
    """Body of ``POST /v1/sessions`` (admin key)."""

    lora: LoraOptions = Field(default_factory=LoraOptions)
    optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    beta: FiniteFloat | None = Field(
        None, gt=0, description="Default beta of the session's requests (unset in a request)."
    )
    loss_type: LossType | None = Field(
        None, description="Default loss_type of the session's requests (unset in a request)."
    )
    reference: Literal["base", "none", "client"] = Field(
        "base",
        description="base: the base model with this adapter off (no second copy); none: "
        "reference-free; client: per-pair reference log-probs sent with every request.",
    )


class SessionInfo(BaseModel):
    """One session (``GET /v1/sessions/{id}``)."""

    id: str = Field(..., description="The session id (s- and 16 hex digits).")
    model_version: int = Field(..., description="Optimizer steps applied to this session.")
    steps: int = Field(..., description="The same count, as steps.")
    trainable_parameters: int = Field(..., description="Trainable adapter elements.")
    state_bytes: int = Field(..., description="Bytes of the adapter and its AdamW state.")
    last_loss: float | None = Field(..., description="Loss of the last step; null before.")
    accumulated_pairs: int = Field(..., description="Pairs accumulated since the last step.")
    accumulated_requests: int = Field(..., description="Requests accumulated since the last step.")
    created: float = Field(..., description="Creation time (Unix seconds).")
    last_used: float = Field(..., description="Last use (Unix seconds).")
    config: SessionCreate = Field(..., description="Its configuration, defaults filled in.")


class SessionCreated(BaseModel):
    """Answer of ``POST /v1/sessions``: the session and its key, shown this once."""

    session: SessionInfo
    key: str = Field(..., description="The session key (Bearer); shown only here.")


class SessionList(BaseModel):
    """``GET /v1/sessions`` (admin key)."""

    sessions: list[SessionInfo] = Field(..., description="Every session.")
    max_sessions: int = Field(..., description="DPO_MAX_SESSIONS.")


class StepRequest(_Strict):
    """Body of ``POST /v1/sessions/{id}/step``."""

    request_id: str | None = Field(
        None, pattern=REQUEST_ID_PATTERN, description="Idempotency key of the step."
    )


class StepResponse(BaseModel):
    """Answer of ``POST /v1/sessions/{id}/step``."""

    session: str = Field(..., description="The session id.")
    new_model_version: int = Field(..., description="The session's version after the step.")
    pairs: int = Field(..., description="Pairs whose gradient the step applied.")
    requests: int = Field(..., description="Accumulated requests the step applied.")
    grad_norm: float = Field(..., description="Gradient norm before clipping.")
    loss: float | None = Field(..., description="Mean loss over the accumulated pairs.")
    request_id: str | None = Field(None, description="The step's request_id, if given.")
    replayed: bool = Field(False, description="A retried request_id: nothing was applied.")


class SessionCheckpoint(BaseModel):
    """Answer of ``POST /v1/sessions/{id}/checkpoint``."""

    session: str = Field(..., description="The session id.")
    model_version: int = Field(..., description="The session's version the file holds.")
    path: str = Field(..., description="Where it was written (server-side path).")
