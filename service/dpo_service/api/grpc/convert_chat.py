"""Conversions of issue 14's fields between ``dpo.v1`` protobuf and the REST JSON shapes:
conversational pairs (``Conversation`` ↔ ``{"prompt": [...], "chosen": ..., ...}``), composed
losses (``loss_terms`` ↔ ``loss_type`` as a list, ``loss_weights``) and per-token log-probs
(``TokenLogps`` ↔ ``chosen_token_logps`` / ``chosen_token_ids``). Used by
:mod:`dpo_service.api.grpc.convert` on both sides (server and client); no torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.errors import invalid

__all__ = [
    "ISSUE14_KEYS",
    "LOSS_TERM_FROM_NAME",
    "LOSS_TERM_TO_NAME",
    "composed_from_dict",
    "composed_to_dict",
    "conversation_from_dict",
    "conversation_to_dict",
    "issue14_from_proto",
    "issue14_to_proto",
    "options_from_dict",
]


def _name(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


# composed losses (issue 14): LOSS_TERM_SFT → "sft"; unknown numbers pass on as they are
LOSS_TERM_TO_NAME: dict[int, str] = {
    v: pb.LossTerm.Name(v).removeprefix("LOSS_TERM_").lower() for v in pb.LossTerm.values()
}
LOSS_TERM_FROM_NAME: dict[str, int] = {
    v: k for k, v in LOSS_TERM_TO_NAME.items() if k != pb.LOSS_TERM_UNSPECIFIED
}


def _messages_to_list(messages: Any) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def conversation_to_dict(conv: pb.Conversation, i: int) -> dict[str, Any]:
    """A ``Conversation`` as the REST conversational pair (no prompt: implicit form)."""
    item: dict[str, Any] = {}
    if len(conv.prompt):
        item["prompt"] = _messages_to_list(conv.prompt)
    for side in ("chosen", "rejected"):
        response = getattr(conv, side)
        kind = response.WhichOneof("response")
        if kind == "messages":
            item[side] = _messages_to_list(response.messages.messages)
        elif kind == "text":
            item[side] = response.text
        else:
            raise invalid(f"pairs[{i}].{side}", "set exactly one of `messages` or `text`")
    return item


def composed_to_dict(msg: pb.ComputeLossRequest, body: dict[str, Any]) -> None:
    """Issue 14's request fields: ``loss_terms`` is REST's ``loss_type`` list."""
    if len(msg.loss_terms):
        if "loss_type" in body:
            raise invalid("loss_type", "set loss_type or loss_terms, not both")
        body["loss_type"] = [LOSS_TERM_TO_NAME.get(t, t) for t in msg.loss_terms]
    if len(msg.loss_weights):
        body["loss_weights"] = list(msg.loss_weights)
    if msg.return_token_logps:
        body["return_token_logps"] = True


ISSUE14_KEYS = ("loss_weights", "return_token_logps")


def composed_from_dict(body: Mapping[str, Any], msg: pb.ComputeLossRequest) -> None:
    for j, term in enumerate(body["loss_type"]):
        name = _name(term)
        if name not in LOSS_TERM_FROM_NAME:
            raise ValueError(f"loss_type[{j}]: unknown loss term {name!r}")
        msg.loss_terms.append(LOSS_TERM_FROM_NAME[name])  # type: ignore[arg-type]


def options_from_dict(body: Mapping[str, Any], msg: pb.ComputeLossRequest) -> None:
    """``loss_weights`` and ``return_token_logps`` of a REST body (``ValueError`` for what the
    proto cannot carry: a weight that is not a number, a flag that is not a boolean)."""
    weights = body.get("loss_weights")
    if weights is not None:
        for j, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ValueError(f"loss_weights[{j}]: must be a number, got {w!r}")
            msg.loss_weights.append(float(w))
    flag = body.get("return_token_logps", False)
    if not isinstance(flag, bool):
        raise ValueError(f"return_token_logps: must be a boolean, got {flag!r}")
    msg.return_token_logps = flag


def _message_list(value: Any, field: str) -> list[pb.Message]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field}: expected a list of messages")
    out = []
    for j, m in enumerate(value):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (0, 0)
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"{field}[{j}]: a message needs a string role and content")
        out.append(pb.Message(role=role, content=content))
    return out


def conversation_from_dict(pair: Mapping[str, Any], i: int) -> pb.Conversation:
    conv = pb.Conversation()
    if pair.get("prompt") is not None:
        conv.prompt.extend(_message_list(pair["prompt"], f"pairs[{i}].prompt"))
    for side in ("chosen", "rejected"):
        value = pair.get(side)
        response = getattr(conv, side)
        if isinstance(value, str):
            response.text = value
        else:
            response.messages.messages.extend(_message_list(value, f"pairs[{i}].{side}"))
    return conv


def issue14_from_proto(msg: pb.ComputeLossResponse) -> dict[str, Any]:
    """Composed-loss terms and token log-probs (None where the REST body has null)."""
    out: dict[str, Any] = {
        "loss_terms": dict(msg.loss_terms) or None,
        "loss_weights": dict(msg.loss_weights) or None,
    }
    for side in ("chosen", "rejected"):
        items = getattr(msg, f"{side}_token_logps")
        out[f"{side}_token_logps"] = [list(t.logps) for t in items] if len(items) else None
        out[f"{side}_token_ids"] = [list(t.token_ids) for t in items] if len(items) else None
    return out


def issue14_to_proto(data: Mapping[str, Any], msg: pb.ComputeLossResponse) -> None:
    """Fill ``msg``'s composed-loss and token log-prob fields from a REST response body."""
    for key in ("loss_terms", "loss_weights"):
        getattr(msg, key).update(data.get(key) or {})
    for side in ("chosen", "rejected"):
        logps, ids = data.get(f"{side}_token_logps"), data.get(f"{side}_token_ids")
        if logps is not None and ids is not None:
            getattr(msg, f"{side}_token_logps").extend(
                pb.TokenLogps(token_ids=i, logps=v) for i, v in zip(ids, logps, strict=True)
            )
