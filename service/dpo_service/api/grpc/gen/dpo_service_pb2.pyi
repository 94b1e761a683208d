from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LossType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_TYPE_UNSPECIFIED: _ClassVar[LossType]
    LOSS_TYPE_SIGMOID: _ClassVar[LossType]
    LOSS_TYPE_HINGE: _ClassVar[LossType]
    LOSS_TYPE_IPO: _ClassVar[LossType]
    LOSS_TYPE_ROBUST: _ClassVar[LossType]
    LOSS_TYPE_SIMPO: _ClassVar[LossType]

class LossTerm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_TERM_UNSPECIFIED: _ClassVar[LossTerm]
    LOSS_TERM_SIGMOID: _ClassVar[LossTerm]
    LOSS_TERM_HINGE: _ClassVar[LossTerm]
    LOSS_TERM_IPO: _ClassVar[LossTerm]
    LOSS_TERM_ROBUST: _ClassVar[LossTerm]
    LOSS_TERM_SIMPO: _ClassVar[LossTerm]
    LOSS_TERM_SFT: _ClassVar[LossTerm]

class ReferenceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFERENCE_MODE_UNSPECIFIED: _ClassVar[ReferenceMode]
    REFERENCE_MODE_AUTO: _ClassVar[ReferenceMode]
    REFERENCE_MODE_NONE: _ClassVar[ReferenceMode]
    REFERENCE_MODE_FROZEN: _ClassVar[ReferenceMode]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_UNAUTHENTICATED: _ClassVar[ErrorCode]
    ERROR_CODE_PERMISSION_DENIED: _ClassVar[ErrorCode]
    ERROR_CODE_TOO_LARGE: _ClassVar[ErrorCode]
    ERROR_CODE_OVERLOADED: _ClassVar[ErrorCode]
    ERROR_CODE_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    ERROR_CODE_CONFLICT: _ClassVar[ErrorCode]
    ERROR_CODE_CANCELLED: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]

class SessionReference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_REFERENCE_UNSPECIFIED: _ClassVar[SessionReference]
    SESSION_REFERENCE_BASE: _ClassVar[SessionReference]
    SESSION_REFERENCE_NONE: _ClassVar[SessionReference]
    SESSION_REFERENCE_CLIENT: _ClassVar[SessionReference]
LOSS_TYPE_UNSPECIFIED: LossType
LOSS_TYPE_SIGMOID: LossType
LOSS_TYPE_HINGE: LossType
LOSS_TYPE_IPO: LossType
LOSS_TYPE_ROBUST: LossType
LOSS_TYPE_SIMPO: LossType
LOSS_TERM_UNSPECIFIED: LossTerm
LOSS_TERM_SIGMOID: LossTerm
LOSS_TERM_HINGE: LossTerm
LOSS_TERM_IPO: LossTerm
LOSS_TERM_ROBUST: LossTerm
LOSS_TERM_SIMPO: LossTerm
LOSS_TERM_SFT: LossTerm
REFERENCE_MODE_UNSPECIFIED: ReferenceMode
REFERENCE_MODE_AUTO: ReferenceMode
REFERENCE_MODE_NONE: ReferenceMode
REFERENCE_MODE_FROZEN: ReferenceMode
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_UNAUTHENTICATED: ErrorCode
ERROR_CODE_PERMISSION_DENIED: ErrorCode
ERROR_CODE_TOO_LARGE: ErrorCode
ERROR_CODE_OVERLOADED: ErrorCode
ERROR_CODE_UNAVAILABLE: ErrorCode
ERROR_CODE_DEADLINE_EXCEEDED: ErrorCode
ERROR_CODE_CONFLICT: ErrorCode
ERROR_CODE_CANCELLED: ErrorCode
ERROR_CODE_NOT_FOUND: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode
SESSION_REFERENCE_UNSPECIFIED: SessionReference
SESSION_REFERENCE_BASE: SessionReference
SESSION_REFERENCE_NONE: SessionReference
SESSION_REFERENCE_CLIENT: SessionReference

class TextTriple(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ...) -> None: ...

class TokenTriple(_message.Message):
    __slots__ = ("prompt_ids", "chosen_ids", "rejected_ids")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    chosen_ids: _containers.RepeatedScalarFieldContainer[int]
    rejected_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., chosen_ids: _Optional[_Iterable[int]] = ..., rejected_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class MessageList(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class ConversationResponse(_message.Message):
    __slots__ = ("messages", "text")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    messages: MessageList
    text: str
    def __init__(self, messages: _Optional[_Union[MessageList, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    prompt: _containers.RepeatedCompositeFieldContainer[Message]
    chosen: ConversationResponse
    rejected: ConversationResponse
    def __init__(self, prompt: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., chosen: _Optional[_Union[ConversationResponse, _Mapping]] = ..., rejected: _Optional[_Union[ConversationResponse, _Mapping]] = ...) -> None: ...

class PreferencePair(_message.Message):
    __slots__ = ("text", "tokens", "conversation", "reference_chosen_logp", "reference_rejected_logp")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_CHOSEN_LOGP_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_REJECTED_LOGP_FIELD_NUMBER: _ClassVar[int]
    text: TextTriple
    tokens: TokenTriple
    conversation: Conversation
    reference_chosen_logp: float
    reference_rejected_logp: float
    def __init__(self, text: _Optional[_Union[TextTriple, _Mapping]] = ..., tokens: _Optional[_Union[TokenTriple, _Mapping]] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., reference_chosen_logp: _Optional[float] = ..., reference_rejected_logp: _Optional[float] = ...) -> None: ...

class ComputeLossRequest(_message.Message):
    __slots__ = ("pairs", "beta", "loss_type", "label_smoothing", "simpo_gamma", "reference", "train", "request_id", "expected_version", "loss_terms", "loss_weights", "return_token_logps", "session", "accumulate")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    SIMPO_GAMMA_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSS_TERMS_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKEN_LOGPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATE_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[PreferencePair]
    beta: float
    loss_type: LossType
    label_smoothing: float
    simpo_gamma: float
    reference: ReferenceMode
    train: bool
    request_id: str
    expected_version: int
    loss_terms: _containers.RepeatedScalarFieldContainer[LossTerm]
    loss_weights: _containers.RepeatedScalarFieldContainer[float]
    return_token_logps: bool
    session: str
    accumulate: bool
    def __init__(self, pairs: _Optional[_Iterable[_Union[PreferencePair, _Mapping]]] = ..., beta: _Optional[float] = ..., loss_type: _Optional[_Union[LossType, str]] = ..., label_smoothing: _Optional[float] = ..., simpo_gamma: _Optional[float] = ..., reference: _Optional[_Union[ReferenceMode, str]] = ..., train: _Optional[bool] = ..., request_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., loss_terms: _Optional[_Iterable[_Union[LossTerm, str]]] = ..., loss_weights: _Optional[_Iterable[float]] = ..., return_token_logps: _Optional[bool] = ..., session: _Optional[str] = ..., accumulate: _Optional[bool] = ...) -> None: ...

class ComputeLossResponse(_message.Message):
    __slots__ = ("loss", "losses", "chosen_logps", "rejected_logps", "reference_chosen_logps", "reference_rejected_logps", "rewards_chosen", "rewards_rejected", "margins", "accuracy", "chosen_tokens", "rejected_tokens", "num_tokens", "metrics", "loss_type", "beta", "model_version", "trained", "grad_norm", "new_model_version", "request_id", "loss_terms", "loss_weights", "chosen_token_logps", "rejected_token_logps", "session", "accumulated_pairs")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LossTermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LossWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_LOGPS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_LOGPS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_CHOSEN_LOGPS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_REJECTED_LOGPS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REWARDS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    MARGINS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_TERMS_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TOKEN_LOGPS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOKEN_LOGPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    losses: _containers.RepeatedScalarFieldContainer[float]
    chosen_logps: _containers.RepeatedScalarFieldContainer[float]
    rejected_logps: _containers.RepeatedScalarFieldContainer[float]
    reference_chosen_logps: _containers.RepeatedScalarFieldContainer[float]
    reference_rejected_logps: _containers.RepeatedScalarFieldContainer[float]
    rewards_chosen: _containers.RepeatedScalarFieldContainer[float]
    rewards_rejected: _containers.RepeatedScalarFieldContainer[float]
    margins: _containers.RepeatedScalarFieldContainer[float]
    accuracy: float
    chosen_tokens: _containers.RepeatedScalarFieldContainer[int]
    rejected_tokens: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    metrics: _containers.ScalarMap[str, float]
    loss_type: LossType
    beta: float
    model_version: int
    trained: bool
    grad_norm: float
    new_model_version: int
    request_id: str
    loss_terms: _containers.ScalarMap[str, float]
    loss_weights: _containers.ScalarMap[str, float]
    chosen_token_logps: _containers.RepeatedCompositeFieldContainer[TokenLogps]
    rejected_token_logps: _containers.RepeatedCompositeFieldContainer[TokenLogps]
    session: str
    accumulated_pairs: int
    def __init__(self, loss: _Optional[float] = ..., losses: _Optional[_Iterable[float]] = ..., chosen_logps: _Optional[_Iterable[float]] = ..., rejected_logps: _Optional[_Iterable[float]] = ..., reference_chosen_logps: _Optional[_Iterable[float]] = ..., reference_rejected_logps: _Optional[_Iterable[float]] = ..., rewards_chosen: _Optional[_Iterable[float]] = ..., rewards_rejected: _Optional[_Iterable[float]] = ..., margins: _Optional[_Iterable[float]] = ..., accuracy: _Optional[float] = ..., chosen_tokens: _Optional[_Iterable[int]] = ..., rejected_tokens: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., loss_type: _Optional[_Union[LossType, str]] = ..., beta: _Optional[float] = ..., model_version: _Optional[int] = ..., trained: _Optional[bool] = ..., grad_norm: _Optional[float] = ..., new_model_version: _Optional[int] = ..., request_id: _Optional[str] = ..., loss_terms: _Optional[_Mapping[str, float]] = ..., loss_weights: _Optional[_Mapping[str, float]] = ..., chosen_token_logps: _Optional[_Iterable[_Union[TokenLogps, _Mapping]]] = ..., rejected_token_logps: _Optional[_Iterable[_Union[TokenLogps, _Mapping]]] = ..., session: _Optional[str] = ..., accumulated_pairs: _Optional[int] = ...) -> None: ...

class TokenLogps(_message.Message):
    __slots__ = ("token_ids", "logps")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logps: _Optional[_Iterable[float]] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "grpc_status", "message", "field_violations", "retry_after_seconds")
    CODE_FIELD_NUMBER: _ClassVar[int]
    GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    grpc_status: int
    message: str
    field_violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    retry_after_seconds: float
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., grpc_status: _Optional[int] = ..., message: _Optional[str] = ..., field_violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ..., retry_after_seconds: _Optional[float] = ...) -> None: ...

class StreamComputeLossRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ComputeLossRequest
    def __init__(self, request: _Optional[_Union[ComputeLossRequest, _Mapping]] = ...) -> None: ...

class StreamComputeLossResponse(_message.Message):
    __slots__ = ("sequence", "model_version", "response", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    model_version: int
    response: ComputeLossResponse
    error: Error
    def __init__(self, sequence: _Optional[int] = ..., model_version: _Optional[int] = ..., response: _Optional[_Union[ComputeLossResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("name", "kind", "parameters", "vocab_size", "max_seq_len", "dtype", "device", "model_version", "tokenizer", "reference", "compute_dtype", "param_dtype", "optimizer_state_dtype", "reduction_dtype", "reference_dtype", "autocast", "loss_scale", "step_rollback", "memory")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    AUTOCAST_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    STEP_ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
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
    compute_dtype: str
    param_dtype: str
    optimizer_state_dtype: str
    reduction_dtype: str
    reference_dtype: str
    autocast: bool
    loss_scale: float
    step_rollback: str
    memory: ModelMemory
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., parameters: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., model_version: _Optional[int] = ..., tokenizer: _Optional[str] = ..., reference: _Optional[bool] = ..., compute_dtype: _Optional[str] = ..., param_dtype: _Optional[str] = ..., optimizer_state_dtype: _Optional[str] = ..., reduction_dtype: _Optional[str] = ..., reference_dtype: _Optional[str] = ..., autocast: _Optional[bool] = ..., loss_scale: _Optional[float] = ..., step_rollback: _Optional[str] = ..., memory: _Optional[_Union[ModelMemory, _Mapping]] = ...) -> None: ...

class ModelMemory(_message.Message):
    __slots__ = ("weights_bytes", "master_copy_bytes", "optimizer_state_bytes", "optimizer_state_bytes_after_step", "gradient_bytes", "rollback_snapshot_bytes", "reference_bytes", "total_bytes")
    class WeightsBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class OptimizerStateBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ReferenceBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MASTER_COPY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_BYTES_AFTER_STEP_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_SNAPSHOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    weights_bytes: _containers.ScalarMap[str, int]
    master_copy_bytes: int
    optimizer_state_bytes: _containers.ScalarMap[str, int]
    optimizer_state_bytes_after_step: int
    gradient_bytes: int
    rollback_snapshot_bytes: int
    reference_bytes: _containers.ScalarMap[str, int]
    total_bytes: int
    def __init__(self, weights_bytes: _Optional[_Mapping[str, int]] = ..., master_copy_bytes: _Optional[int] = ..., optimizer_state_bytes: _Optional[_Mapping[str, int]] = ..., optimizer_state_bytes_after_step: _Optional[int] = ..., gradient_bytes: _Optional[int] = ..., rollback_snapshot_bytes: _Optional[int] = ..., reference_bytes: _Optional[_Mapping[str, int]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("model_version", "path", "weights_sha256")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    path: str
    weights_sha256: str
    def __init__(self, model_version: _Optional[int] = ..., path: _Optional[str] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class SessionLora(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "seed")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class SessionOptimizer(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "weight_decay", "grad_clip")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    grad_clip: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., weight_decay: _Optional[float] = ..., grad_clip: _Optional[float] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("lora", "optimizer", "beta", "loss_type", "reference")
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    lora: SessionLora
    optimizer: SessionOptimizer
    beta: float
    loss_type: LossType
    reference: SessionReference
    def __init__(self, lora: _Optional[_Union[SessionLora, _Mapping]] = ..., optimizer: _Optional[_Union[SessionOptimizer, _Mapping]] = ..., beta: _Optional[float] = ..., loss_type: _Optional[_Union[LossType, str]] = ..., reference: _Optional[_Union[SessionReference, str]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("id", "model_version", "steps", "trainable_parameters", "state_bytes", "last_loss", "accumulated_pairs", "accumulated_requests", "created", "last_used", "config")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_version: int
    steps: int
    trainable_parameters: int
    state_bytes: int
    last_loss: float
    accumulated_pairs: int
    accumulated_requests: int
    created: float
    last_used: float
    config: SessionConfig
    def __init__(self, id: _Optional[str] = ..., model_version: _Optional[int] = ..., steps: _Optional[int] = ..., trainable_parameters: _Optional[int] = ..., state_bytes: _Optional[int] = ..., last_loss: _Optional[float] = ..., accumulated_pairs: _Optional[int] = ..., accumulated_requests: _Optional[int] = ..., created: _Optional[float] = ..., last_used: _Optional[float] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session", "key")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    key: str
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "max_sessions")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    max_sessions: int
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class CheckpointSessionResponse(_message.Message):
    __slots__ = ("session", "model_version", "path")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    session: str
    model_version: int
    path: str
    def __init__(self, session: _Optional[str] = ..., model_version: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session", "request_id")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session: str
    request_id: str
    def __init__(self, session: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session", "new_model_version", "pairs", "requests", "grad_norm", "loss", "request_id", "replayed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    session: str
    new_model_version: int
    pairs: int
    requests: int
    grad_norm: float
    loss: float
    request_id: str
    replayed: bool
    def __init__(self, session: _Optional[str] = ..., new_model_version: _Optional[int] = ..., pairs: _Optional[int] = ..., requests: _Optional[int] = ..., grad_norm: _Optional[float] = ..., loss: _Optional[float] = ..., request_id: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...
