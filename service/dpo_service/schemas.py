"""Request and response models shared by the REST and gRPC adapters.

Field descriptions are the API documentation: they show up in the OpenAPI schema, and the
proto file's comments say the same. Log-probabilities are natural-log nats summed over the
response tokens; rewards are ``beta * (logp - reference_logp)`` in the same units.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
)

from modern_llm.alignment.dpo_loss import LossType

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
REQUEST_ID_PATTERN = r"^[!-~]{1,128}$"
#: A session id (issue 12): "s-" and 16 lowercase hex digits.
SESSION_ID_PATTERN = r"^s-[0-9a-f]{16}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _PairReference(_Strict):
    reference_chosen_logp: FiniteFloat | None = Field(
        None, description="Reference policy's summed log-prob of the chosen response (nats)."
    )
    reference_rejected_logp: FiniteFloat | None = Field(
        None, description="Reference policy's summed log-prob of the rejected response (nats)."
    )


class TextPair(_PairReference):
    """A preference triple as text; the service tokenizes it (BOS + prompt, response + EOS)."""

    prompt: StrictStr = Field(..., description="Prompt text (may be empty: BOS is prepended).")
    chosen: StrictStr = Field(..., description="Preferred response text (non-empty).")
    rejected: StrictStr = Field(..., description="Dispreferred response text (non-empty).")


class TokenPair(_PairReference):
    """A preference triple as token ids, used exactly as given (no BOS/EOS added)."""

    prompt_ids: list[StrictInt] = Field(..., description="Prompt token ids (at least one).")
    chosen_ids: list[StrictInt] = Field(..., description="Chosen response token ids (non-empty).")
    rejected_ids: list[StrictInt] = Field(
        ..., description="Rejected response token ids (non-empty)."
    )


# --- conversational pairs (issue 14; see README "Conversations, composed losses, token
# log-probs" and dpo_service.conversations for the rules) ----------------------------------
class Message(_Strict):
    """One chat message, as in TRL's conversational datasets."""

    role: Literal["system", "user", "assistant", "tool"] = Field(
        ..., description="system (first message only), user, assistant or tool."
    )
    content: StrictStr = Field(..., description="The message text (non-empty).")


def _list_or_other(list_tag: str, other_tag: str) -> Discriminator:
    """Tag a union by the input's JSON type, so an error comes from one member only."""
    return Discriminator(lambda v: list_tag if isinstance(v, list) else other_tag)


Response = Annotated[
    Annotated[list[Message], Tag("message_list")] | Annotated[StrictStr, Tag("text")],
    _list_or_other("message_list", "text"),
]


class ConversationPair(_PairReference):
    """A preference pair as chat messages; the service applies the model's chat template
    (TRL's rendering). Conversational form: ``prompt`` messages ending with a user message
    (or an assistant message the responses continue), ``chosen`` / ``rejected`` assistant
    messages or strings. Implicit-prompt form: no ``prompt``; ``chosen`` / ``rejected`` are
    whole conversations whose shared leading messages are the prompt."""

    prompt: list[Message] | None = Field(
        None, description="Prompt messages; leave out for the implicit-prompt form."
    )
    chosen: Response = Field(
        ...,
        description="Preferred response: assistant messages, a string, or (implicit "
        "prompt) the whole conversation.",
    )
    rejected: Response = Field(
        ..., description="Dispreferred response, in the same form as chosen."
    )


def _pair_kind(value: Any) -> str:
    if isinstance(value, dict):
        if any(isinstance(value.get(k), list) for k in ("prompt", "chosen", "rejected")):
            return "conversation"
        return "tokens" if any(k.endswith("_ids") for k in value) else "text"
    if isinstance(value, ConversationPair):
        return "conversation"
    return "tokens" if isinstance(value, TokenPair) else "text"


Pair = Annotated[
    Annotated[TextPair, Tag("text")]
    | Annotated[TokenPair, Tag("tokens")]
    | Annotated[ConversationPair, Tag("conversation")],
    Discriminator(_pair_kind),
]


class LossRequest(_Strict):
    """Body of ``POST /dpo/loss`` (and of gRPC ``ComputeLossRequest``)."""

    pairs: list[Pair] = Field(..., min_length=1, description="Preference triples (1..max).")
    beta: FiniteFloat = Field(0.1, gt=0, description="DPO temperature β (> 0).")
    loss_type: Annotated[
        Annotated[LossType, Tag("one_loss")]
        | Annotated[list[StrictStr], Field(max_length=16), Tag("loss_list")],
        _list_or_other("loss_list", "one_loss"),
    ] = Field(
        LossType.SIGMOID,
        description="sigmoid (DPO; without a reference this is the seed's simplified loss), "
        "hinge, ipo, robust, simpo; or a list of distinct terms (those and sft: the chosen "
        "response's length-normalised NLL) weighted by loss_weights, as TRL's loss_type list.",
    )
    label_smoothing: FiniteFloat = Field(
        0.0, ge=0, lt=0.5, description="cDPO / robust label smoothing ε in [0, 0.5)."
    )
    simpo_gamma: FiniteFloat = Field(0.5, description="SimPO target reward margin γ.")
    reference: Literal["auto", "none", "frozen"] = Field(
        "auto",
        description="auto: use per-pair reference log-probs when given, else none; none: "
        "reference-free; frozen: the service's frozen copy of the initial weights.",
    )
    train: StrictBool = Field(
        False,
        description="Apply one optimizer step with this batch's loss (a JSON boolean: "
        '"true", 1 and the like are refused).',
    )
    request_id: Annotated[str, Field(pattern=REQUEST_ID_PATTERN)] | None = Field(
        None,
        description="Idempotency key for train requests (1-128 printable ASCII characters, no "
        "spaces); echoed back. The only idempotency key: the X-Request-ID header is a tracing "
        "id. Reusing a key with a different request is a 409.",
    )
    expected_version: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Train only if the model version equals this (else 409); a JSON integer."
    )
    # --- composed losses and token log-probs (issue 14) -------------------------------
    loss_weights: Annotated[list[FiniteFloat], Field(max_length=16)] | None = Field(
        None,
        description="With loss_type a list: one finite weight >= 0 per term (at least one "
        "> 0); null: 1.0 each (TRL's loss_weights).",
    )
    return_token_logps: StrictBool = Field(
        False,
        description="Also return every response's per-token log-probs and token ids "
        "(chosen_token_logps, chosen_token_ids, ...); a JSON boolean.",
    )
    # --- sessions: LoRA adapters (issue 12; README "Sessions and LoRA") ---------------
    session: Annotated[str, Field(pattern=SESSION_ID_PATTERN)] | None = Field(
        None,
        description="Run on this session's LoRA adapter (authorised by the session key); "
        "null: the default model, as before. Unset beta/loss_type take the session's "
        "defaults; reference auto means the session's reference choice.",
    )
    accumulate: StrictBool = Field(
        False,
        description="With train=true and a session: add this request's gradient to the "
        "session's buffer without stepping (POST /v1/sessions/{id}/step applies one step "
        "over everything accumulated); the version does not move.",
    )


class LossResponse(BaseModel):
    """DPO loss and per-pair statistics (TRL's metric names in ``metrics``)."""

    loss: float = Field(..., description="Mean of the per-pair losses.")
    losses: list[float] = Field(..., description="Per-pair loss.")
    chosen_logps: list[float] = Field(
        ..., description="Policy log-prob of each chosen response (nats, summed)."
    )
    rejected_logps: list[float] = Field(
        ..., description="Policy log-prob of each rejected response (nats, summed)."
    )
    reference_chosen_logps: list[float] | None = Field(
        None, description="Reference log-probs used, if any."
    )
    reference_rejected_logps: list[float] | None = Field(
        None, description="Reference log-probs used, if any."
    )
    rewards_chosen: list[float] = Field(..., description="β·(logp − ref) of the chosen responses.")
    rewards_rejected: list[float] = Field(
        ..., description="β·(logp − ref) of the rejected responses."
    )
    margins: list[float] = Field(..., description="rewards_chosen − rewards_rejected.")
    accuracy: float = Field(
        ..., description="Fraction of pairs with rewards_chosen > rewards_rejected."
    )
    chosen_tokens: list[int] = Field(..., description="Response tokens scored per chosen response.")
    rejected_tokens: list[int] = Field(
        ..., description="Response tokens scored per rejected response."
    )
    num_tokens: int = Field(..., description="Tokens processed (prompt counted once per sequence).")
    metrics: dict[str, float] = Field(
        ..., description="TRL metric names: rewards/chosen, logps/chosen, …"
    )
    loss_type: LossType = Field(
        ...,
        description="The loss computed; for a composed loss its first preference term, "
        "whose rewards are reported (sigmoid for sft alone).",
    )
    beta: float
    model_version: int = Field(
        ..., description="Optimizer steps applied before this loss was computed."
    )
    trained: bool = Field(False, description="Whether an optimizer step was applied.")
    grad_norm: float | None = Field(
        None, description="Gradient L2 norm before clipping (train only)."
    )
    new_model_version: int | None = Field(
        None, description="Model version after the step (train only)."
    )
    request_id: str | None = Field(
        None, description="The request id (given, or assigned by the server)."
    )
    # --- composed losses and token log-probs (issue 14) -------------------------------
    loss_terms: dict[str, float] | None = Field(
        None,
        description="loss_type given as a list: each term's batch mean, unweighted (loss is "
        "the weighted total); null otherwise.",
    )
    loss_weights: dict[str, float] | None = Field(
        None, description="loss_type given as a list: the weight of each term; null otherwise."
    )
    chosen_token_logps: list[list[float]] | None = Field(
        None,
        description="return_token_logps: per chosen response, each token's log-prob (nats; "
        "they sum to chosen_logps).",
    )
    chosen_token_ids: list[list[int]] | None = Field(
        None, description="return_token_logps: per chosen response, the token ids scored."
    )
    rejected_token_logps: list[list[float]] | None = Field(
        None,
        description="return_token_logps: per rejected response, each token's log-prob (nats; "
        "they sum to rejected_logps).",
    )
    rejected_token_ids: list[list[int]] | None = Field(
        None, description="return_token_logps: per rejected response, the token ids scored."
    )
    # --- sessions (issue 12) ------------------------------------------------------------
    session: str | None = Field(None, description="The session the request ran on, if any.")
    accumulated_pairs: int | None = Field(
        None,
        description="accumulate=true: pairs accumulated in the session since its last step "
        "(this request's included); null otherwise.",
    )


class ModelMemory(BaseModel):
    """Bytes the service holds for its model; maps are keyed by dtype name."""

    weights_bytes: dict[str, int] = Field(
        ..., description="The served model's parameters and buffers, by dtype."
    )
    master_copy_bytes: int = Field(
        ..., description="A separate master copy: 0, the float32 parameters are the master."
    )
    optimizer_state_bytes: dict[str, int] = Field(
        ..., description="AdamW state held now, by dtype (empty until the first step)."
    )
    optimizer_state_bytes_after_step: int = Field(
        ..., description="AdamW state once it has stepped (two moments + a step counter)."
    )
    gradient_bytes: int = Field(
        ..., description="Gradients a train step holds while it runs (released after)."
    )
    rollback_snapshot_bytes: int = Field(
        ..., description='Host copy held during a step with step_rollback "snapshot" (else 0).'
    )
    reference_bytes: dict[str, int] = Field(
        ..., description="The frozen reference copy, by dtype (empty without one)."
    )
    total_bytes: int = Field(
        ..., description="Held now between steps: weights + optimizer state + reference."
    )


class ModelInfo(BaseModel):
    """``GET /v1/model``: the model, the precision policy and its memory."""

    name: str
    kind: str = Field(..., description="builtin, modern_llm or hf.")
    parameters: int
    vocab_size: int
    max_seq_len: int
    dtype: str = Field(..., description="DPO_DTYPE, the compute dtype (= compute_dtype).")
    device: str
    model_version: int
    tokenizer: str
    reference: bool = Field(..., description="Whether a frozen reference copy is kept.")
    compute_dtype: str = Field(
        ..., description="Dtype of the forward and backward passes (autocast when not float32)."
    )
    param_dtype: str = Field(
        ..., description="Dtype of the trainable parameters (the master weights AdamW updates)."
    )
    optimizer_state_dtype: str = Field(..., description="Dtype of AdamW's moments.")
    reduction_dtype: str = Field(
        ..., description="Dtype of log-sum-exp, the sum over response tokens and the loss."
    )
    reference_dtype: str | None = Field(
        ..., description="Dtype of the frozen reference's linear layers; null without one."
    )
    autocast: bool = Field(..., description="Whether the passes run under torch.autocast.")
    loss_scale: float | None = Field(
        ..., description="Current dynamic loss scale of float16 training; null otherwise."
    )
    step_rollback: str = Field(
        ..., description="How a non-finite optimizer update is kept out: verify or snapshot."
    )
    memory: ModelMemory
