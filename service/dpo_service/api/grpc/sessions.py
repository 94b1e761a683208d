"""``dpo.v1.SessionService`` (issue 12): thin calls into
:class:`~dpo_service.engine.sessions.service.SessionService`, exactly as ``/v1/sessions``;
messages are converted to the REST shapes and validated by the same models, errors abort
with the same trailers as ``DpoService``."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from pydantic import ValidationError

from dpo_service.api.common import observed
from dpo_service.api.grpc.convert import LOSS_TYPE_FROM_NAME, LOSS_TYPE_TO_NAME
from dpo_service.api.grpc.convert_sessions import config_to_dict, info_to_proto, step_to_proto
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.servicer import (
    _abort,
    _api_key,
    _internal,
    safe_deserializer,
    unusable,
)
from dpo_service.engine.admission import Admission
from dpo_service.engine.sessions.service import config_from_wire, describe
from dpo_service.errors import ServiceError, from_pydantic
from dpo_service.schemas_sessions import SessionCreate, StepRequest

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionService"].full_name
_LOSS_PB: dict[str, int] = {k: int(v) for k, v in LOSS_TYPE_FROM_NAME.items()}
_LOSS_NAME: dict[int, str] = {int(k): v for k, v in LOSS_TYPE_TO_NAME.items()}


def _info(data: dict[str, Any]) -> pb.SessionInfo:
    return info_to_proto(data, _LOSS_PB)


class SessionServicer:
    """``dpo.v1.SessionService``: proto ↔ SessionService, nothing else."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.sessions = admission.sessions
        self.events = admission.engine.events

    async def _call(
        self,
        name: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        work: Callable[[Any, str | None], Awaitable[Any]],
    ) -> Any:
        try:
            with observed(self.events, name, "grpc"):
                key = _api_key(context)
                error = unusable(request)
                if error is not None:
                    raise error
                return await work(request, key)
        except ServiceError as exc:
            error = exc
        except ValidationError as exc:
            error = from_pydantic(exc)
        except Exception:
            error = _internal(name)
        await _abort(context, error)
        raise AssertionError("unreachable")

    async def CreateSession(self, request: Any, context: Any) -> pb.CreateSessionResponse:
        async def work(msg: pb.CreateSessionRequest, key: str | None) -> Any:
            self.sessions._admin(key)
            body = SessionCreate.model_validate(config_to_dict(msg.config, _LOSS_NAME))
            session, session_key = await self.sessions.create(
                config_from_wire(body.model_dump(mode="json")), key
            )
            return pb.CreateSessionResponse(session=_info(describe(session)), key=session_key)

        return await self._call("create_session", request, context, work)

    async def ListSessions(self, request: Any, context: Any) -> pb.ListSessionsResponse:
        async def work(msg: Any, key: str | None) -> Any:
            found = self.sessions.list(key)
            return pb.ListSessionsResponse(
                sessions=[_info(s) for s in found],
                max_sessions=self.admission.settings.max_sessions,
            )

        return await self._call("list_sessions", request, context, work)

    async def GetSession(self, request: Any, context: Any) -> pb.GetSessionResponse:
        async def work(msg: pb.GetSessionRequest, key: str | None) -> Any:
            return pb.GetSessionResponse(session=_info(self.sessions.get(msg.session, key)))

        return await self._call("get_session", request, context, work)

    async def DeleteSession(self, request: Any, context: Any) -> pb.DeleteSessionResponse:
        async def work(msg: pb.DeleteSessionRequest, key: str | None) -> Any:
            await self.sessions.delete(msg.session, key)
            return pb.DeleteSessionResponse()

        return await self._call("delete_session", request, context, work)

    async def CheckpointSession(self, request: Any, context: Any) -> pb.CheckpointSessionResponse:
        async def work(msg: pb.CheckpointSessionRequest, key: str | None) -> Any:
            info = await self.sessions.checkpoint(msg.session, key)
            return pb.CheckpointSessionResponse(**info)

        return await self._call("checkpoint_session", request, context, work)

    async def Step(self, request: Any, context: Any) -> pb.StepResponse:
        async def work(msg: pb.StepRequest, key: str | None) -> Any:
            body = StepRequest.model_validate(
                {"request_id": msg.request_id} if msg.HasField("request_id") else {}
            )
            outcome = await self.sessions.step(msg.session, body.request_id, key)
            return step_to_proto(dataclasses.asdict(outcome))

        return await self._call("step_session", request, context, work)


def session_handlers(admission: Admission, max_bytes: int) -> grpc.GenericRpcHandler:
    """The ``SessionService`` method handlers (unparsable or oversized messages answered as
    on ``DpoService``)."""
    servicer = SessionServicer(admission)
    requests = {
        "CreateSession": pb.CreateSessionRequest,
        "ListSessions": pb.ListSessionsRequest,
        "GetSession": pb.GetSessionRequest,
        "DeleteSession": pb.DeleteSessionRequest,
        "CheckpointSession": pb.CheckpointSessionRequest,
        "Step": pb.StepRequest,
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=safe_deserializer(cls, max_bytes),
            response_serializer=lambda m: bytes(m.SerializeToString()),
        )
        for name, cls in requests.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
