"""Sessions (issue 12) between protobuf and the REST shapes: the ``session``/``accumulate``
fields of ``ComputeLossRequest``/``Response`` and the ``SessionService`` messages. A message
becomes the REST body (unset optional fields left out, so the same defaults and validation
apply) and REST-shaped dicts become messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpo_service.api.grpc.gen import dpo_service_pb2 as pb

_REFERENCE_NAME = {
    pb.SESSION_REFERENCE_BASE: "base",
    pb.SESSION_REFERENCE_NONE: "none",
    pb.SESSION_REFERENCE_CLIENT: "client",
}
_REFERENCE_PB = {v: k for k, v in _REFERENCE_NAME.items()}
_LORA_KEYS = ("rank", "alpha", "dropout", "seed")
_OPT_KEYS = ("lr", "weight_decay", "grad_clip")


def session_request_to_dict(msg: pb.ComputeLossRequest, body: dict[str, Any]) -> None:
    """Add ``session`` and ``accumulate`` of a ``ComputeLossRequest`` to its REST body."""
    if msg.HasField("session"):
        body["session"] = msg.session
    if msg.accumulate:
        body["accumulate"] = True


def session_response_to_proto(data: Mapping[str, Any], msg: pb.ComputeLossResponse) -> None:
    if data.get("session") is not None:
        msg.session = data["session"]
    if data.get("accumulated_pairs") is not None:
        msg.accumulated_pairs = int(data["accumulated_pairs"])


def config_to_dict(msg: pb.SessionConfig, loss_type_name: dict[int, str]) -> dict[str, Any]:
    """A ``SessionConfig`` as the ``POST /v1/sessions`` body."""
    lora = {k: getattr(msg.lora, k) for k in _LORA_KEYS if msg.lora.HasField(k)}
    if msg.lora.target_modules:
        lora["target_modules"] = list(msg.lora.target_modules)
    opt: dict[str, Any] = {
        k: getattr(msg.optimizer, k) for k in _OPT_KEYS if msg.optimizer.HasField(k)
    }
    if msg.optimizer.HasField("beta1") or msg.optimizer.HasField("beta2"):
        opt["betas"] = [
            msg.optimizer.beta1 if msg.optimizer.HasField("beta1") else 0.9,
            msg.optimizer.beta2 if msg.optimizer.HasField("beta2") else 0.999,
        ]
    body: dict[str, Any] = {"lora": lora, "optimizer": opt}
    if msg.HasField("beta"):
        body["beta"] = msg.beta
    if msg.loss_type != pb.LOSS_TYPE_UNSPECIFIED:
        body["loss_type"] = loss_type_name.get(msg.loss_type, msg.loss_type)
    if msg.reference != pb.SESSION_REFERENCE_UNSPECIFIED:
        body["reference"] = _REFERENCE_NAME.get(msg.reference, msg.reference)
    return body


def config_to_proto(data: Mapping[str, Any], loss_type_pb: dict[str, int]) -> pb.SessionConfig:
    lora, opt = data["lora"], data["optimizer"]
    msg = pb.SessionConfig(
        lora=pb.SessionLora(
            rank=lora["rank"],
            alpha=lora["alpha"],
            dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            seed=lora["seed"],
        ),
        optimizer=pb.SessionOptimizer(
            lr=opt["lr"],
            beta1=opt["betas"][0],
            beta2=opt["betas"][1],
            weight_decay=opt["weight_decay"],
            grad_clip=opt["grad_clip"],
        ),
        reference=_REFERENCE_PB[data["reference"]],
    )
    if data.get("beta") is not None:
        msg.beta = data["beta"]
    if data.get("loss_type") is not None:
        msg.loss_type = loss_type_pb[str(data["loss_type"])]  # type: ignore[assignment]
    return msg


def info_to_proto(data: Mapping[str, Any], loss_type_pb: dict[str, int]) -> pb.SessionInfo:
    """A ``SessionInfo`` dict as a message."""
    msg = pb.SessionInfo(
        id=data["id"],
        model_version=data["model_version"],
        steps=data["steps"],
        trainable_parameters=data["trainable_parameters"],
        state_bytes=data["state_bytes"],
        accumulated_pairs=data["accumulated_pairs"],
        accumulated_requests=data["accumulated_requests"],
        created=data["created"],
        last_used=data["last_used"],
        config=config_to_proto(data["config"], loss_type_pb),
    )
    if data.get("last_loss") is not None:
        msg.last_loss = data["last_loss"]
    return msg


def step_to_proto(data: Mapping[str, Any]) -> pb.StepResponse:
    msg = pb.StepResponse(
        session=data["session"],
        new_model_version=data["new_model_version"],
        pairs=data["pairs"],
        requests=data["requests"],
        grad_norm=data["grad_norm"],
        replayed=bool(data.get("replayed", False)),
    )
    for key in ("loss", "request_id"):
        if data.get(key) is not None:
            setattr(msg, key, data[key])
    return msg


#: ``ComputeLossRequest`` fields of sessions, in their REST names (the client's direction).
SESSION_KEYS = ("session", "accumulate")


def session_from_dict(body: Mapping[str, Any], msg: pb.ComputeLossRequest) -> None:
    """The client's direction: ``session``/``accumulate`` of a REST body into ``msg``."""
    if body.get("session") is not None:
        msg.session = str(body["session"])
    if body.get("accumulate"):
        msg.accumulate = True


def session_from_proto(msg: pb.ComputeLossResponse) -> dict[str, Any]:
    """The client's direction: the response's session fields in their REST shape."""
    return {
        "session": msg.session if msg.HasField("session") else None,
        "accumulated_pairs": (msg.accumulated_pairs if msg.HasField("accumulated_pairs") else None),
    }
