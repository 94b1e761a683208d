"""``/v1/sessions``: LoRA training sessions over REST (issue 12), thin calls into
:class:`~dpo_service.engine.sessions.service.SessionService`. Create and list need the admin
key; the rest takes the session's key (or the admin key)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from fastapi.responses import Response

from dpo_service.api.common import observed
from dpo_service.api.http.routes import ERROR_RESPONSES, AdmissionDep, KeyDep
from dpo_service.engine.sessions.service import SessionService, config_from_wire, describe
from dpo_service.schemas import SESSION_ID_PATTERN
from dpo_service.schemas_sessions import (
    SessionCheckpoint,
    SessionCreate,
    SessionCreated,
    SessionInfo,
    SessionList,
    StepRequest,
    StepResponse,
)

RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"description": "No such session (or sessions are off)."},
    429: {"description": "DPO_MAX_SESSIONS reached, or the queue is full."},
}
router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
SessionId = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="The session id.")]


def sessions(admission: AdmissionDep) -> SessionService:
    return admission.sessions


ServiceDep = Annotated[SessionService, Depends(sessions)]


def _events(service: SessionService) -> Any:
    return service.engine.events


@router.post("", response_model=SessionCreated, responses=RESPONSES, status_code=201,
             summary="Create a session (admin key); its key is shown only in this answer.")  # fmt: skip
async def create_session(
    service: ServiceDep, key: KeyDep, body: Annotated[SessionCreate, Body()]
) -> SessionCreated:
    with observed(_events(service), "create_session", "http"):
        service._admin(key)  # before anything about the body is acted on
        session, session_key = await service.create(
            config_from_wire(body.model_dump(mode="json")), key
        )
        return SessionCreated(
            session=SessionInfo.model_validate(describe(session)), key=session_key
        )


@router.get(
    "", response_model=SessionList, responses=RESPONSES, summary="All sessions (admin key)."
)
async def list_sessions(service: ServiceDep, key: KeyDep) -> SessionList:
    with observed(_events(service), "list_sessions", "http"):
        found = service.list(key)
        return SessionList(
            sessions=[SessionInfo.model_validate(s) for s in found],
            max_sessions=service.engine.settings.max_sessions,
        )


@router.get("/{session_id}", response_model=SessionInfo, responses=RESPONSES,
            summary="One session: version, steps, sizes, last loss (session or admin key).")  # fmt: skip
async def get_session(service: ServiceDep, key: KeyDep, session_id: SessionId) -> SessionInfo:
    with observed(_events(service), "get_session", "http"):
        return SessionInfo.model_validate(service.get(session_id, key))


@router.delete("/{session_id}", status_code=204, responses=RESPONSES,
               summary="Delete a session and free its adapter (session or admin key).")  # fmt: skip
async def delete_session(service: ServiceDep, key: KeyDep, session_id: SessionId) -> Response:
    with observed(_events(service), "delete_session", "http"):
        await service.delete(session_id, key)
        return Response(status_code=204)


@router.post("/{session_id}/step", response_model=StepResponse, responses=RESPONSES,
             summary="One optimizer step over the accumulated gradient (session key).")  # fmt: skip
async def step_session(
    service: ServiceDep,
    key: KeyDep,
    session_id: SessionId,
    body: Annotated[StepRequest | None, Body()] = None,
) -> StepResponse:
    with observed(_events(service), "step_session", "http"):
        request_id = None if body is None else body.request_id
        outcome = await service.step(session_id, request_id, key)
        return StepResponse.model_validate(outcome, from_attributes=True)


@router.post("/{session_id}/checkpoint", response_model=SessionCheckpoint, responses=RESPONSES,
             summary="Write the session's checkpoint now (session or admin key).")  # fmt: skip
async def checkpoint_session(
    service: ServiceDep, key: KeyDep, session_id: SessionId
) -> SessionCheckpoint:
    with observed(_events(service), "checkpoint_session", "http"):
        return SessionCheckpoint.model_validate(await service.checkpoint(session_id, key))


@router.get("/{session_id}/adapter", responses=RESPONSES, response_class=Response,
            summary="The adapter in PEFT's format: a tar of adapter_config.json and "
            "adapter_model.safetensors (session or admin key).")  # fmt: skip
async def export_adapter(service: ServiceDep, key: KeyDep, session_id: SessionId) -> Response:
    with observed(_events(service), "export_adapter", "http"):
        data = await service.export(session_id, key)
        return Response(
            data,
            media_type="application/x-tar",
            headers={"Content-Disposition": f'attachment; filename="{session_id}-adapter.tar"'},
        )
