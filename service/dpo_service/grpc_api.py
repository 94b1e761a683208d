"""gRPC adapter (thin): ``dpo.v1.DpoService`` on a ``grpc.aio`` server sharing the one Core.

Each RPC converts its proto message to the REST body (:mod:`dpo_service.grpc_convert`), runs
it through :meth:`Core.parse` and :meth:`Core.compute` exactly as ``POST /dpo/loss`` does, and
converts the result back, so both protocols give identical numbers and error classes.

- Auth: metadata ``authorization: Bearer <KEY>`` (training and ``Checkpoint``).
- Errors: a :class:`ServiceError` aborts the RPC with ``errors.GRPC_STATUS[code]``; trailing
  metadata ``dpo-error-code`` carries the service's error class (``too_large`` and
  ``overloaded`` are both RESOURCE_EXHAUSTED), ``dpo-error-bin`` the serialized
  ``dpo.v1.Error`` (the first 20 field violations: metadata is size-limited) and, for
  OVERLOADED/UNAVAILABLE, ``retry-after`` (whole seconds). A message that does not parse as protobuf is INVALID_ARGUMENT, a message
  over ``grpc_max_message_bytes`` is RESOURCE_EXHAUSTED (grpc itself); only genuine server
  bugs are INTERNAL.
- Deadlines: ``context.time_remaining()`` goes down to the engine, which drops expired work
  before the model sees it; a client that cancels drops its queued work the same way.
- ``StreamComputeLoss`` answers every batch in order (one at a time); a failing batch gets
  an ``error`` answer and the stream goes on.
- Health: the standard ``grpc.health.v1.Health`` service, NOT_SERVING until
  :meth:`GrpcServer.set_serving` (for ``""`` and ``dpo.v1.DpoService``); server reflection.

Channel options set on the server:

``grpc.max_receive_message_length`` / ``grpc.max_send_message_length``
    ``settings.grpc_max_message_bytes`` (larger messages: RESOURCE_EXHAUSTED).
``grpc.keepalive_time_ms`` = 30000, ``grpc.keepalive_timeout_ms`` = 10000
    the server pings a connection idle for 30 s and drops it when no ack comes in 10 s
    (dead trainers' streams do not linger).
``grpc.http2.min_ping_interval_without_data_ms`` = 10000, ``grpc.keepalive_permit_without_calls`` = 1,
``grpc.http2.max_ping_strikes`` = 2
    clients may keep idle channels alive with pings at most every 10 s; faster pings get the
    connection closed (GOAWAY ``too_many_pings``) after 2 strikes.
``grpc.so_reuseport`` = 0
    a second server cannot silently share the port.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dpo_service.core import Core
from dpo_service.errors import GRPC_STATUS, ErrorCode, ServiceError
from dpo_service.grpc_convert import (
    error_to_proto,
    model_info_to_proto,
    request_to_dict,
    response_to_proto,
)
from dpo_service.grpc_gen import dpo_service_pb2 as pb
from dpo_service.schemas import REQUEST_ID_PATTERN, LossResponse
from dpo_service.settings import Settings

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DpoService"].full_name  # "dpo.v1.DpoService"

KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 2),
]


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request that did not parse, so the handler can answer it properly."""

    error: str


def _safe_deserializer(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return _Undecodable(f"the message is not a valid {cls.DESCRIPTOR.full_name}: {exc}")

    return parse


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return None


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    value = _metadata(context, "authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


MAX_TRAILER_VIOLATIONS = 20  # metadata is capped at 8-16 KiB: keep errors well under it
MAX_DETAILS_CHARS = 2000


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
    if exc.retry_after_s is not None or exc.code in (ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE):
        out.append(("retry-after", str(max(1, round(exc.retry_after_s or 1.0)))))
    return tuple(out)  # grpc.aio wants a tuple


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    status = grpc.StatusCode[GRPC_STATUS[exc.code]]
    await context.abort(status, exc.message[:MAX_DETAILS_CHARS], _trailers(exc))


def _internal(what: str) -> ServiceError:
    log.exception("gRPC %s failed", what)
    return ServiceError(ErrorCode.INTERNAL, f"internal error in {what}")


class DpoServicer:
    """``dpo.v1.DpoService``: proto ↔ Core, nothing else."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def _compute(
        self, message: Any, context: grpc.aio.ServicerContext, api_key: str | None
    ) -> LossResponse:
        if isinstance(message, _Undecodable):
            raise ServiceError(ErrorCode.INVALID_ARGUMENT, message.error)
        body = request_to_dict(message)
        header_id = _metadata(context, "x-request-id")
        if "request_id" not in body and header_id and _REQUEST_ID.fullmatch(header_id):
            body["request_id"] = header_id
        request = self.core.parse(body)
        return await self.core.compute(
            request, api_key=api_key, protocol="grpc", timeout_s=context.time_remaining()
        )

    async def ComputeLoss(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.ComputeLossResponse:
        try:
            response = await self._compute(request, context, _bearer(context))
            return response_to_proto(response.model_dump())
        except ServiceError as exc:
            error = exc
        except Exception:
            error = _internal("ComputeLoss")
        await _abort(context, error)
        raise AssertionError("unreachable")  # context.abort raises

    async def StreamComputeLoss(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamComputeLossResponse]:
        api_key = _bearer(context)
        sequence = 0
        async for item in request_iterator:
            inner = item if isinstance(item, _Undecodable) else item.request
            try:
                response = await self._compute(inner, context, api_key)
                answer = pb.StreamComputeLossResponse(
                    sequence=sequence,
                    model_version=response.model_version,
                    response=response_to_proto(response.model_dump()),
                )
            except ServiceError as exc:
                answer = self._error_answer(sequence, exc)
            except Exception:
                answer = self._error_answer(sequence, _internal("StreamComputeLoss"))
            yield answer
            sequence += 1

    def _error_answer(self, sequence: int, exc: ServiceError) -> pb.StreamComputeLossResponse:
        return pb.StreamComputeLossResponse(
            sequence=sequence, model_version=self.core.engine.version, error=error_to_proto(exc)
        )

    async def GetModelInfo(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        started = time.monotonic()
        code = "ok"
        try:
            return model_info_to_proto(self.core.engine.info().model_dump())
        except ServiceError as exc:
            code, error = exc.code.value, exc
        except Exception:
            code, error = ErrorCode.INTERNAL.value, _internal("GetModelInfo")
        finally:
            self.core.engine.events.on_request(
                "model_info", "grpc", code, time.monotonic() - started
            )
        await _abort(context, error)
        raise AssertionError("unreachable")

    async def Checkpoint(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointResponse:
        checkpoint: Callable[[], Awaitable[Any]] | None = getattr(self.core, "checkpoint", None)
        try:
            self.core.authorize(_bearer(context), privileged=True)
            if checkpoint is not None:
                result = await checkpoint()
                return _checkpoint_response(result, self.core.engine.version)
        except ServiceError as exc:
            error = exc
        except Exception:
            error = _internal("Checkpoint")
        else:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server cannot write checkpoints (its core has no checkpoint support)",
            )
        await _abort(context, error)
        raise AssertionError("unreachable")


def _checkpoint_response(result: Any, version: int) -> pb.CheckpointResponse:
    """What ``Core.checkpoint()`` returns (a dict, a path or an object) as the proto."""
    if isinstance(result, (str, os.PathLike)):
        result = {"path": result}
    elif result is not None and not isinstance(result, dict):
        result = {
            k: getattr(result, k)
            for k in ("path", "version", "weights_sha256")
            if hasattr(result, k)
        }
    data: dict[str, Any] = result or {}
    found = data.get("model_version", data.get("version"))
    return pb.CheckpointResponse(
        model_version=int(found) if found is not None else version,
        path="" if data.get("path") is None else os.fspath(data["path"]),
        weights_sha256=str(data.get("weights_sha256") or ""),
    )


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def _handlers(servicer: DpoServicer) -> grpc.GenericRpcHandler:
    """Method handlers as the generated ``add_DpoServiceServicer_to_server`` builds them,
    but with a deserializer that turns unparsable bytes into INVALID_ARGUMENT."""
    handlers = {
        "ComputeLoss": grpc.unary_unary_rpc_method_handler(
            servicer.ComputeLoss,
            request_deserializer=_safe_deserializer(pb.ComputeLossRequest),
            response_serializer=_serialize,
        ),
        "StreamComputeLoss": grpc.stream_stream_rpc_method_handler(
            servicer.StreamComputeLoss,
            request_deserializer=_safe_deserializer(pb.StreamComputeLossRequest),
            response_serializer=_serialize,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=_safe_deserializer(pb.GetModelInfoRequest),
            response_serializer=_serialize,
        ),
        "Checkpoint": grpc.unary_unary_rpc_method_handler(
            servicer.Checkpoint,
            request_deserializer=_safe_deserializer(pb.CheckpointRequest),
            response_serializer=_serialize,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class GrpcServer:
    """The running gRPC listener: ``port``, ``set_serving``, ``stop``."""

    def __init__(self, server: grpc.aio.Server, health: HealthServicer, port: int) -> None:
        self.server = server
        self.health = health
        self.port = port

    async def set_serving(self, serving: bool) -> None:
        """Health status of the whole server (``""``) and of ``dpo.v1.DpoService``."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 1.0) -> None:
        """NOT_SERVING, then stop accepting RPCs; in-flight RPCs get ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    size = settings.grpc_max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        *KEEPALIVE_OPTIONS,
        ("grpc.so_reuseport", 0),
    ]


async def start_grpc_server(core: Core, settings: Settings) -> GrpcServer:
    """Bind ``settings.host:settings.grpc_port`` (0 picks a port) and start serving.

    Health starts NOT_SERVING; the caller flips it with :meth:`GrpcServer.set_serving`.
    """
    server = grpc.aio.server(options=server_options(settings))
    server.add_generic_rpc_handlers((_handlers(DpoServicer(core)),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )  # fmt: skip
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC: cannot bind {address}: {exc}") from exc
    if port == 0:
        raise RuntimeError(f"gRPC: cannot bind {address}")
    await server.start()
    grpc_server = GrpcServer(server, health, port)
    await grpc_server.set_serving(False)
    log.info("gRPC listening on %s:%d", settings.host, port)
    return grpc_server
