"""The gRPC listener: a ``grpc.aio`` server with ``dpo.v1.DpoService`` (:mod:`.servicer`),
the standard ``grpc.health.v1.Health`` service (NOT_SERVING until
:meth:`GrpcServer.set_serving`, for ``""`` and ``dpo.v1.DpoService``) and server reflection.

Channel options set on the server:

``grpc.max_receive_message_length``
    twice ``settings.grpc_max_message_bytes``: the service's deserializer refuses anything over
    the limit itself (RESOURCE_EXHAUSTED with the ``dpo-error-code: too_large`` trailers,
    never parsed); grpc's own check, without those trailers, stops messages over twice the
    limit before they are buffered whole.
``grpc.max_send_message_length``
    ``settings.grpc_max_message_bytes``.
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
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.servicer import SERVICE_NAME, DpoServicer, safe_deserializer
from dpo_service.api.grpc.sessions import SERVICE_NAME as SESSION_SERVICE
from dpo_service.api.grpc.sessions import session_handlers
from dpo_service.engine.admission import Admission
from dpo_service.settings import Settings

log = logging.getLogger(__name__)

KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 2),
]


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def _handlers(servicer: DpoServicer, max_bytes: int) -> grpc.GenericRpcHandler:
    """Method handlers as the generated ``add_DpoServiceServicer_to_server`` builds them,
    but with a deserializer that turns unparsable bytes into INVALID_ARGUMENT and messages
    over ``max_bytes`` into RESOURCE_EXHAUSTED, on every RPC; loss requests are parsed by
    their handler, off the event loop."""
    handlers = {
        "ComputeLoss": grpc.unary_unary_rpc_method_handler(
            servicer.ComputeLoss,
            request_deserializer=safe_deserializer(pb.ComputeLossRequest, max_bytes, defer=True),
            response_serializer=_serialize,
        ),
        "StreamComputeLoss": grpc.stream_stream_rpc_method_handler(
            servicer.StreamComputeLoss,
            request_deserializer=safe_deserializer(
                pb.StreamComputeLossRequest, max_bytes, defer=True
            ),
            response_serializer=_serialize,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=safe_deserializer(pb.GetModelInfoRequest, max_bytes),
            response_serializer=_serialize,
        ),
        "Checkpoint": grpc.unary_unary_rpc_method_handler(
            servicer.Checkpoint,
            request_deserializer=safe_deserializer(pb.CheckpointRequest, max_bytes),
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
        ("grpc.max_receive_message_length", min(2 * size, 2**31 - 1)),
        ("grpc.max_send_message_length", size),
        *KEEPALIVE_OPTIONS,
        ("grpc.so_reuseport", 0),
    ]


async def start_grpc_server(admission: Admission, settings: Settings) -> GrpcServer:
    """Bind ``settings.host:settings.grpc_port`` (0 picks a port) and start serving.

    Health starts NOT_SERVING; the caller flips it with :meth:`GrpcServer.set_serving`.
    """
    server = grpc.aio.server(options=server_options(settings))
    servicer = DpoServicer(admission)
    server.add_generic_rpc_handlers((_handlers(servicer, settings.grpc_max_message_bytes),))
    server.add_generic_rpc_handlers(  # issue 12: dpo.v1.SessionService
        (session_handlers(admission, settings.grpc_max_message_bytes),)
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, SESSION_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
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
