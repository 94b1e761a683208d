"""The ``dpo.v1.DpoService`` methods (thin): proto → REST-shaped dict → the engine's
:class:`~dpo_service.engine.admission.Admission`, exactly as ``POST /dpo/loss`` does, and the
result back to proto, so both protocols give identical numbers and error classes.

- Auth: metadata ``authorization: Bearer <KEY>`` (training and ``Checkpoint``).
- Errors: a :class:`ServiceError` aborts the RPC with ``errors.GRPC_STATUS[code]``; trailing
  metadata ``dpo-error-code`` carries the service's error class (``too_large`` and
  ``overloaded`` are both RESOURCE_EXHAUSTED), ``dpo-error-bin`` the serialized
  ``dpo.v1.Error`` (the first 20 field violations: metadata is size-limited) and, for
  OVERLOADED/UNAVAILABLE, ``retry-after`` (whole seconds). A message that does not parse as
  protobuf is INVALID_ARGUMENT, a message over ``grpc_max_message_bytes`` is
  RESOURCE_EXHAUSTED (grpc itself); only genuine server bugs are INTERNAL.
- Deadlines: ``context.time_remaining()`` goes down to the engine, which drops expired work
  before the model sees it; a client that cancels drops its queued work the same way.
- ``StreamComputeLoss`` answers every batch in order (one at a time); a failing batch gets
  an ``error`` answer and the stream goes on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from dpo_service.api.common import (
    REQUEST_ID_HEADER,
    bearer_token,
    grpc_status_name,
    observed,
    parse_loss_request,
    retry_after_seconds,
    valid_request_id,
)
from dpo_service.api.grpc.convert import (
    error_to_proto,
    model_info_to_proto,
    request_to_dict,
    response_to_proto,
)
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.engine.admission import Admission
from dpo_service.engine.results import LossResult
from dpo_service.errors import ErrorCode, ServiceError

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DpoService"].full_name  # "dpo.v1.DpoService"
MAX_TRAILER_VIOLATIONS = 20  # metadata is capped at 8-16 KiB: keep errors well under it
MAX_DETAILS_CHARS = 2000


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request that did not parse, so the handler can answer it properly."""

    error: str


def safe_deserializer(cls: Any) -> Callable[[bytes], Any]:
    """``cls.FromString``, but unparsable bytes become :class:`Undecodable`."""

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return Undecodable(f"the message is not a valid {cls.DESCRIPTOR.full_name}: {exc}")

    return parse


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return None


def _api_key(context: grpc.aio.ServicerContext) -> str | None:
    return bearer_token(_metadata(context, "authorization"))


def _trailers(exc: ServiceError) -> tuple[tuple[str, str | bytes], ...]:
    detail = error_to_proto(exc)
    if len(detail.field_violations) > MAX_TRAILER_VIOLATIONS:
        del detail.field_violations[MAX_TRAILER_VIOLATIONS:]
    for violation in detail.field_violations:
        violation.description = violation.description[:200]
    detail.message = detail.message[:MAX_DETAILS_CHARS]
    out: list[tuple[str, str | bytes]] = [
        ("dpo-error-code", exc.code.value),
        ("dpo-error-bin", detail.SerializeToString()),
    ]
    retry_after = retry_after_seconds(exc)
    if retry_after is not None:
        out.append(("retry-after", str(retry_after)))
    return tuple(out)  # grpc.aio wants a tuple


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    status = grpc.StatusCode[grpc_status_name(exc)]
    await context.abort(status, exc.message[:MAX_DETAILS_CHARS], _trailers(exc))


def _internal(what: str) -> ServiceError:
    log.exception("gRPC %s failed", what)
    return ServiceError(ErrorCode.INTERNAL, f"internal error in {what}")


class DpoServicer:
    """``dpo.v1.DpoService``: proto ↔ Admission, nothing else."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.events = admission.engine.events

    async def _compute(
        self, message: Any, context: grpc.aio.ServicerContext, api_key: str | None
    ) -> LossResult:
        with observed(self.events, "compute_loss", "grpc", in_flight=True) as call:
            if isinstance(message, Undecodable):
                raise ServiceError(ErrorCode.INVALID_ARGUMENT, message.error)
            body = request_to_dict(message)
            header_id = valid_request_id(_metadata(context, REQUEST_ID_HEADER))
            if "request_id" not in body and header_id:
                body["request_id"] = header_id
            request = parse_loss_request(body)
            result = await self.admission.compute(
                request, api_key=api_key, timeout_s=context.time_remaining()
            )
            call.tokens = result.num_tokens
            return result

    async def ComputeLoss(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.ComputeLossResponse:
        try:
            result = await self._compute(request, context, _api_key(context))
            return response_to_proto(result.as_dict())
        except ServiceError as exc:
            error = exc
        except Exception:
            error = _internal("ComputeLoss")
        await _abort(context, error)
        raise AssertionError("unreachable")  # context.abort raises

    async def StreamComputeLoss(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamComputeLossResponse]:
        api_key = _api_key(context)
        sequence = 0
        async for item in request_iterator:
            inner = item if isinstance(item, Undecodable) else item.request
            try:
                result = await self._compute(inner, context, api_key)
                answer = pb.StreamComputeLossResponse(
                    sequence=sequence,
                    model_version=result.model_version,
                    response=response_to_proto(result.as_dict()),
                )
            except ServiceError as exc:
                answer = self._error_answer(sequence, exc)
            except Exception:
                answer = self._error_answer(sequence, _internal("StreamComputeLoss"))
            yield answer
            sequence += 1

    def _error_answer(self, sequence: int, exc: ServiceError) -> pb.StreamComputeLossResponse:
        return pb.StreamComputeLossResponse(
            sequence=sequence,
            model_version=self.admission.engine.version,
            error=error_to_proto(exc),
        )

    async def GetModelInfo(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            with observed(self.events, "model_info", "grpc"):
                return model_info_to_proto(self.admission.engine.info().as_dict())
        except ServiceError as exc:
            error = exc
        except Exception:
            error = _internal("GetModelInfo")
        await _abort(context, error)
        raise AssertionError("unreachable")

    async def Checkpoint(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointResponse:
        try:
            with observed(self.events, "checkpoint", "grpc"):
                self.admission.authorize(_api_key(context), privileged=True)
                info = await self.admission.checkpoint()
                return pb.CheckpointResponse(
                    model_version=int(info.get("version", self.admission.engine.version)),
                    path=str(info.get("path") or ""),
                    weights_sha256=str(info.get("weights_sha256") or ""),
                )
        except ServiceError as exc:
            error = exc
        except Exception:
            error = _internal("Checkpoint")
        await _abort(context, error)
        raise AssertionError("unreachable")
