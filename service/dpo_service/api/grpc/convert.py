"""Conversions between the ``dpo.v1`` protobuf messages and the REST JSON shapes.

Both directions work on plain dicts (the JSON bodies of ``POST /dpo/loss`` and its response),
so the server adapter and the Python client share them and neither needs torch here.

Presence is preserved: an unset ``optional`` field becomes an absent key, so the request
gets exactly the REST default (``beta`` → 0.1, reference log-probs → not given), and an absent
key becomes an unset field. ``LOSS_TYPE_UNSPECIFIED`` / ``REFERENCE_MODE_UNSPECIFIED`` mean
"the default"; enum numbers this version does not know are passed on as they are, so schema
validation rejects them exactly as REST rejects an unknown name.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from dpo_service.api.grpc.convert_chat import (
    ISSUE14_KEYS,
    composed_from_dict,
    composed_to_dict,
    conversation_from_dict,
    conversation_to_dict,
    issue14_from_proto,
    issue14_to_proto,
    options_from_dict,
)
from dpo_service.api.grpc.convert_sessions import (
    SESSION_KEYS,
    session_from_dict,
    session_from_proto,
    session_request_to_dict,
    session_response_to_proto,
)
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.errors import GRPC_STATUS, ErrorCode, ServiceError, invalid

LOSS_TYPE_TO_NAME: dict[pb.LossType, str] = {
    pb.LOSS_TYPE_SIGMOID: "sigmoid",
    pb.LOSS_TYPE_HINGE: "hinge",
    pb.LOSS_TYPE_IPO: "ipo",
    pb.LOSS_TYPE_ROBUST: "robust",
    pb.LOSS_TYPE_SIMPO: "simpo",
}
LOSS_TYPE_FROM_NAME: dict[str, pb.LossType] = {v: k for k, v in LOSS_TYPE_TO_NAME.items()}

REFERENCE_TO_NAME: dict[pb.ReferenceMode, str] = {
    pb.REFERENCE_MODE_AUTO: "auto",
    pb.REFERENCE_MODE_NONE: "none",
    pb.REFERENCE_MODE_FROZEN: "frozen",
}
REFERENCE_FROM_NAME: dict[str, pb.ReferenceMode] = {v: k for k, v in REFERENCE_TO_NAME.items()}

ERROR_CODE_TO_PROTO: dict[ErrorCode, pb.ErrorCode] = {
    code: pb.ErrorCode.Value(f"ERROR_CODE_{code.name}") for code in ErrorCode
}
ERROR_CODE_FROM_PROTO: dict[pb.ErrorCode, ErrorCode] = {
    v: k for k, v in ERROR_CODE_TO_PROTO.items()
}

# grpc.StatusCode names → their numeric values (google.rpc.Code), without importing grpc.
GRPC_CODE_NUMBERS: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip

_OPTIONAL_SCALARS = ("beta", "label_smoothing", "simpo_gamma", "request_id", "expected_version")
_TEXT_KEYS = ("prompt", "chosen", "rejected")
_ID_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REF_KEYS = ("reference_chosen_logp", "reference_rejected_logp")


# ----------------------------------------------------------------------- server side
def check_request_size(
    msg: pb.ComputeLossRequest,
    *,
    max_pairs: int,
    max_request_tokens: int,
    max_sequence_tokens: int | None = None,
) -> None:
    """Refuse (INVALID_ARGUMENT, the same messages as the service's own checks) a request
    whose pair count or token ids exceed the limits, from the parsed message's lengths alone:
    nothing is converted to Python objects first, so a message of millions of ids costs its
    parse and no more. Text is measured after tokenization, as for REST."""
    if len(msg.pairs) > max_pairs:
        raise invalid("pairs", f"{len(msg.pairs)} pairs, more than the limit of {max_pairs}")
    total = 0
    for i, pair in enumerate(msg.pairs):
        if pair.WhichOneof("input") != "tokens":
            continue
        ids = pair.tokens
        prompt = len(ids.prompt_ids)
        for name, n in (
            ("chosen_ids", len(ids.chosen_ids)),
            ("rejected_ids", len(ids.rejected_ids)),
        ):
            if max_sequence_tokens is not None and prompt + n > max_sequence_tokens:
                raise invalid(
                    f"pairs[{i}].{name}",
                    f"prompt + response is {prompt + n} tokens, more than the limit of "
                    f"{max_sequence_tokens}",
                )
            total += n
        total += prompt
    if total > max_request_tokens:
        raise invalid(
            "pairs", f"the request has {total} tokens, more than the limit of {max_request_tokens}"
        )


def request_to_dict(msg: pb.ComputeLossRequest) -> dict[str, Any]:
    """A ``ComputeLossRequest`` as the equivalent REST body (for ``Admission.parse``)."""
    pairs: list[dict[str, Any]] = []
    for i, pair in enumerate(msg.pairs):
        kind = pair.WhichOneof("input")
        item: dict[str, Any]
        if kind == "text":
            item = {k: getattr(pair.text, k) for k in _TEXT_KEYS}
        elif kind == "tokens":
            item = {k: list(getattr(pair.tokens, k)) for k in _ID_KEYS}
        elif kind == "conversation":
            item = conversation_to_dict(pair.conversation, i)
        else:
            raise invalid(f"pairs[{i}]", "set exactly one of `text`, `tokens` or `conversation`")
        for key in _REF_KEYS:
            if pair.HasField(key):
                item[key] = getattr(pair, key)
        pairs.append(item)
    body: dict[str, Any] = {"pairs": pairs}
    for key in _OPTIONAL_SCALARS:
        if msg.HasField(key):
            body[key] = getattr(msg, key)
    if msg.loss_type != pb.LOSS_TYPE_UNSPECIFIED:
        body["loss_type"] = LOSS_TYPE_TO_NAME.get(msg.loss_type, msg.loss_type)
    if msg.reference != pb.REFERENCE_MODE_UNSPECIFIED:
        body["reference"] = REFERENCE_TO_NAME.get(msg.reference, msg.reference)
    if msg.train:
        body["train"] = True
    composed_to_dict(msg, body)
    session_request_to_dict(msg, body)  # issue 12
    return body


def _name(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def response_to_proto(data: Mapping[str, Any]) -> pb.ComputeLossResponse:
    """A ``LossResponse.model_dump()`` as a ``ComputeLossResponse``."""
    msg = pb.ComputeLossResponse(
        loss=data["loss"],
        losses=data["losses"],
        chosen_logps=data["chosen_logps"],
        rejected_logps=data["rejected_logps"],
        reference_chosen_logps=data.get("reference_chosen_logps") or [],
        reference_rejected_logps=data.get("reference_rejected_logps") or [],
        rewards_chosen=data["rewards_chosen"],
        rewards_rejected=data["rewards_rejected"],
        margins=data["margins"],
        accuracy=data["accuracy"],
        chosen_tokens=data["chosen_tokens"],
        rejected_tokens=data["rejected_tokens"],
        num_tokens=data["num_tokens"],
        metrics=dict(data["metrics"]),
        loss_type=LOSS_TYPE_FROM_NAME[_name(data["loss_type"])],
        beta=data["beta"],
        model_version=data["model_version"],
        trained=bool(data.get("trained", False)),
    )
    for key in ("grad_norm", "new_model_version", "request_id"):
        if data.get(key) is not None:
            setattr(msg, key, data[key])
    issue14_to_proto(data, msg)
    session_response_to_proto(data, msg)  # issue 12
    return msg


def model_info_to_proto(data: Mapping[str, Any]) -> pb.GetModelInfoResponse:
    """A ``ModelInfo.model_dump()`` as a ``GetModelInfoResponse`` (None leaves an optional
    field unset; ``memory`` becomes a ``ModelMemory``)."""
    fields = pb.GetModelInfoResponse.DESCRIPTOR.fields_by_name
    values = {k: v for k, v in data.items() if k in fields and v is not None}
    memory = values.pop("memory", None)
    msg = pb.GetModelInfoResponse(**values)
    if memory is not None:
        known = pb.ModelMemory.DESCRIPTOR.fields_by_name
        msg.memory.CopyFrom(pb.ModelMemory(**{k: v for k, v in memory.items() if k in known}))
    return msg


def error_to_proto(exc: ServiceError) -> pb.Error:
    """A :class:`ServiceError` as the ``Error`` of a stream answer."""
    msg = pb.Error(
        code=ERROR_CODE_TO_PROTO[exc.code],
        grpc_status=GRPC_CODE_NUMBERS[GRPC_STATUS[exc.code]],
        message=exc.message,
        field_violations=[
            pb.FieldViolation(field=e.field, description=e.message) for e in exc.errors
        ],
    )
    if exc.retry_after_s is not None:
        msg.retry_after_seconds = exc.retry_after_s
    return msg


# ----------------------------------------------------------------------- client side
def request_from_dict(body: Mapping[str, Any]) -> pb.ComputeLossRequest:
    """A REST body as a ``ComputeLossRequest``. Raises ``ValueError`` for what proto cannot
    carry (unknown keys, a pair that is neither text nor tokens, an unknown loss name)."""
    known = {
        "pairs", "loss_type", "reference", "train", *_OPTIONAL_SCALARS, *ISSUE14_KEYS,
        *SESSION_KEYS,
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown request field")
    msg = pb.ComputeLossRequest(train=bool(body.get("train", False)))
    for key in _OPTIONAL_SCALARS:
        if body.get(key) is not None:
            setattr(msg, key, body[key])
    options_from_dict(body, msg)
    session_from_dict(body, msg)  # issue 12
    if isinstance(body.get("loss_type"), (list, tuple)):
        composed_from_dict(body, msg)
    elif body.get("loss_type") is not None:
        name = _name(body["loss_type"])
        if name not in LOSS_TYPE_FROM_NAME:
            raise ValueError(f"loss_type: unknown loss type {name!r}")
        msg.loss_type = LOSS_TYPE_FROM_NAME[name]
    if body.get("reference") is not None:
        name = _name(body["reference"])
        if name not in REFERENCE_FROM_NAME:
            raise ValueError(f"reference: unknown reference mode {name!r}")
        msg.reference = REFERENCE_FROM_NAME[name]
    for i, pair in enumerate(body.get("pairs") or []):
        msg.pairs.append(_pair_from_dict(pair, i))
    return msg


def _pair_from_dict(pair: Mapping[str, Any], i: int) -> pb.PreferencePair:
    keys = set(pair)
    unknown = sorted(keys - {*_TEXT_KEYS, *_ID_KEYS, *_REF_KEYS})
    if unknown:
        raise ValueError(f"pairs[{i}].{unknown[0]}: unknown pair field")
    out = pb.PreferencePair()
    if any(isinstance(pair.get(k), (list, tuple)) for k in _TEXT_KEYS):
        out.conversation.CopyFrom(conversation_from_dict(pair, i))
    elif keys & set(_ID_KEYS):
        out.tokens.CopyFrom(pb.TokenTriple(**{k: list(pair.get(k) or []) for k in _ID_KEYS}))
    else:
        out.text.CopyFrom(pb.TextTriple(**{k: pair.get(k, "") for k in _TEXT_KEYS}))
    for key in _REF_KEYS:
        if pair.get(key) is not None:
            setattr(out, key, float(pair[key]))
    return out


def response_from_proto(msg: pb.ComputeLossResponse) -> dict[str, Any]:
    """A ``ComputeLossResponse`` as the REST response body (``None`` where REST has null)."""
    return {
        "loss": msg.loss,
        "losses": list(msg.losses),
        "chosen_logps": list(msg.chosen_logps),
        "rejected_logps": list(msg.rejected_logps),
        "reference_chosen_logps": list(msg.reference_chosen_logps) or None,
        "reference_rejected_logps": list(msg.reference_rejected_logps) or None,
        "rewards_chosen": list(msg.rewards_chosen),
        "rewards_rejected": list(msg.rewards_rejected),
        "margins": list(msg.margins),
        "accuracy": msg.accuracy,
        "chosen_tokens": list(msg.chosen_tokens),
        "rejected_tokens": list(msg.rejected_tokens),
        "num_tokens": msg.num_tokens,
        "metrics": dict(msg.metrics),
        "loss_type": LOSS_TYPE_TO_NAME.get(msg.loss_type, "sigmoid"),
        "beta": msg.beta,
        "model_version": msg.model_version,
        "trained": msg.trained,
        "grad_norm": msg.grad_norm if msg.HasField("grad_norm") else None,
        "new_model_version": msg.new_model_version if msg.HasField("new_model_version") else None,
        "request_id": msg.request_id if msg.HasField("request_id") else None,
        **issue14_from_proto(msg),
        **session_from_proto(msg),  # issue 12
    }


def _memory_from_proto(msg: pb.ModelMemory) -> dict[str, Any]:
    return {
        f.name: dict(sorted(getattr(msg, f.name).items()))
        if f.message_type is not None  # map fields
        else getattr(msg, f.name)
        for f in msg.DESCRIPTOR.fields
    }


def model_info_from_proto(msg: pb.GetModelInfoResponse) -> dict[str, Any]:
    """A ``GetModelInfoResponse`` as the REST ``GET /v1/model`` body (unset optional fields
    as None, ``memory`` as a dict with its maps sorted by dtype)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        if f.name == "memory":
            out[f.name] = _memory_from_proto(msg.memory) if msg.HasField("memory") else None
        elif f.has_presence and not msg.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = getattr(msg, f.name)
    return out
