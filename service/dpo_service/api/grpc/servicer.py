"""The ``dpo.v1.DpoService`` methods (thin): proto → REST-shaped dict → the engine's
:class:`~dpo_service.engine.admission.Admission`, exactly as ``POST /dpo/loss`` does, and the
result back to proto, so both protocols give identical numbers and error classes.

- Auth: metadata ``authorization: Bearer <KEY>`` (training and ``Checkpoint``; every loss call
  with ``DPO_REQUIRE_KEY_FOR_LOSS``, checked before anything about the message); two
  ``authorization`` values are UNAUTHENTICATED.
- Idempotency: only the message's ``request_id`` (each stream message its own); ``x-request-id``
  metadata is a tracing id and never an idempotency key.
- Sizes: ``len()`` of the parsed message's repeated fields is checked against the pair and
  token limits before anything is converted to Python objects (:func:`check_request_size`);
  conversion, validation and tokenization run off the event loop.
- Errors: a :class:`ServiceError` aborts the RPC with ``errors.GRPC_STATUS[code]``; trailing
  metadata ``dpo-error-code`` carries the service's error class (``too_large`` and
  ``overloaded`` are both RESOURCE_EXHAUSTED), ``dpo-error-bin`` the serialized
  ``dpo.v1.Error`` (the first 20 field violations: metadata is size-limited) and, for
  OVERLOADED/UNAVAILABLE, ``retry-after`` (whole seconds). A message that does not parse as
  protobuf is INVALID_ARGUMENT on every RPC; a message over ``grpc_max_message_bytes`` is
  RESOURCE_EXHAUSTED with these trailers up to twice that size (grpc's own limit, without
  them, above: see :func:`~dpo_service.api.grpc.server.server_options`); only genuine server
  bugs are INTERNAL.
- Deadlines: ``context.time_remaining()`` goes down to the engine, which drops expired work
  before the model sees it; a client that cancels drops its queued work the same way.
- ``StreamComputeLoss`` answers every batch in order (one at a time); a failing batch gets
  an ``error`` answer and the stream goes on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from dpo_service.api.common import (
    bearer_token,
    grpc_status_name,
    observed,
    parse_loss_request,
    retry_after_seconds,
    single_value,
)
from dpo_service.api.grpc.convert import (
    check_request_size,
    error_to_proto,
    model_info_to_proto,
    request_to_dict,
    response_to_proto,
)
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.wire import check_wire_size
from dpo_service.engine.admission import Admission
from dpo_service.engine.results import LossResult
from dpo_service.engine.sessions.service import session_fields
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.schemas import LossRequest

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DpoService"].full_name  # "dpo.v1.DpoService"
MAX_TRAILER_VIOLATIONS = 20  # metadata is capped at 8-16 KiB: keep errors well under it
MAX_DETAILS_CHARS = 2000


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request that did not parse, so the handler can answer it properly."""

    error: str


@dataclass(frozen=True)
class TooLarge:
    """Stands in for a request over ``grpc_max_message_bytes`` (answered RESOURCE_EXHAUSTED
    with the service's trailers)."""

    size: int
    limit: int

    def error(self) -> ServiceError:
        return ServiceError(
            ErrorCode.TOO_LARGE,
            f"the message is {self.size} bytes, larger than the limit of {self.limit} "
            "(DPO_GRPC_MAX_MESSAGE_BYTES)",
        )


def parse_message(cls: Any, data: bytes) -> Any:
    """``cls.FromString(data)``, or :class:`Undecodable` for bytes that do not parse."""
    try:
        return cls.FromString(data)
    except (DecodeError, ValueError, UnicodeDecodeError) as exc:
        return Undecodable(f"the message is not a valid {cls.DESCRIPTOR.full_name}: {exc}")


@dataclass(frozen=True)
class Deferred:
    """A message's bytes, parsed by the handler off the event loop (a message of millions of
    ids costs a noticeable parse: never on the loop, and at most two at a time)."""

    cls: Any
    data: bytes

    def parse(self) -> Any:
        return parse_message(self.cls, self.data)


def safe_deserializer(
    cls: Any, max_bytes: int | None = None, *, defer: bool = False
) -> Callable[[bytes], Any]:
    """``cls.FromString``, but unparsable bytes become :class:`Undecodable` and more than
    ``max_bytes`` bytes :class:`TooLarge` (never parsed); with ``defer`` the handler gets a
    :class:`Deferred` and parses it itself."""

    def parse(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return TooLarge(len(data), max_bytes)
        return Deferred(cls, data) if defer else parse_message(cls, data)

    return parse


def unusable(message: Any) -> ServiceError | None:
    """The error of a message that did not parse or was too large, else None."""
    if isinstance(message, TooLarge):
        return message.error()
    if isinstance(message, Undecodable):
        return ServiceError(ErrorCode.INVALID_ARGUMENT, message.error)
    return None


def _api_key(context: grpc.aio.ServicerContext) -> str | None:
    """The bearer key of the call (UNAUTHENTICATED for two ``authorization`` values)."""
    values = [
        v
        for k, v in (context.invocation_metadata() or ())
        if k == "authorization" and isinstance(v, str)
    ]
    return bearer_token(single_value(values, "authorization metadata"))


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

    def _parse(self, message: Any, api_key: str | None) -> LossRequest:
        """Runs off the event loop: pair and id counts on the bytes; bytes → proto (a stream
        message is unwrapped); the key of a train request; sizes on the parsed message; then
        proto → dict → :class:`LossRequest`."""
        settings, engine = self.admission.settings, self.admission.engine
        if isinstance(message, Deferred):
            check_wire_size(
                message.data,
                max_pairs=settings.max_pairs_per_request,
                max_request_tokens=settings.max_request_tokens,
                stream=message.cls is pb.StreamComputeLossRequest,
            )
            message = message.parse()
            if isinstance(message, pb.StreamComputeLossRequest):
                message = message.request
        error = unusable(message)
        if error is not None:
            raise error
        if not message.HasField("session"):  # a session's key is checked when prepared
            self.admission.authorize(api_key, privileged=message.train)
        check_request_size(
            message,
            max_pairs=settings.max_pairs_per_request,
            max_request_tokens=settings.max_request_tokens,
            max_sequence_tokens=(
                engine.limits().max_sequence_tokens if engine.bundle is not None else None
            ),
        )
        return parse_loss_request(request_to_dict(message))

    async def _compute(self, message: Any, context: grpc.aio.ServicerContext) -> LossResult:
        with observed(self.events, "compute_loss", "grpc", in_flight=True) as call:
            remaining = context.time_remaining()
            if remaining is not None:
                call.deadline = time.monotonic() + remaining
            api_key = _api_key(context)
            self.admission.authorize_loss_call(api_key)  # DPO_REQUIRE_KEY_FOR_LOSS
            error = unusable(message)
            if error is not None:
                raise error
            result = await self.admission.compute(
                functools.partial(self._parse, message, api_key),
                api_key=api_key,
                timeout_s=context.time_remaining(),
            )
            call.tokens = result.num_tokens
            return result

    async def ComputeLoss(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.ComputeLossResponse:
        try:
            result = await self._compute(request, context)
            return response_to_proto({**result.as_dict(), **session_fields(result)})
        except ServiceError as exc:
            error = exc
        except Exception:
            error = _internal("ComputeLoss")
        await _abort(context, error)
        raise AssertionError("unreachable")  # context.abort raises

    async def StreamComputeLoss(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamComputeLossResponse]:
        sequence = 0
        async for item in request_iterator:
            try:
                result = await self._compute(item, context)
                answer = pb.StreamComputeLossResponse(
                    sequence=sequence,
                    model_version=result.model_version,
                    response=response_to_proto({**result.as_dict(), **session_fields(result)}),
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
                error = unusable(request)
                if error is not None:
                    raise error
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
                error = unusable(request)
                if error is not None:
                    raise error
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
