"""The HTTP endpoints, on one :class:`APIRouter`. The admission control and the bearer key
come in as dependencies; each endpoint is a thin call into the engine's admission."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from dpo_service.api.common import (
    bearer_token,
    current_request_id,
    observed,
    request_context,
    valid_request_id,
)
from dpo_service.api.http.errors import error_response
from dpo_service.engine.admission import Admission
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.schemas import LossRequest, LossResponse, ModelInfo

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key (training/admin calls)."},
    409: {"description": "Stale expected_version."},
    413: {"description": "Request body too large."},
    422: {"description": "Invalid input; `errors` names each field and pair index."},
    429: {"description": "Queue full; retry after `Retry-After` seconds."},
    503: {"description": "Model loading or server draining."},
    504: {"description": "The request's deadline passed."},
}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {},
    404: {"description": "Checkpoints are off."},
    503: {},
}

router = APIRouter()


def admission(request: Request) -> Admission:
    """The app's admission control (503 until the app has one)."""
    found: Admission | None = getattr(request.app.state, "admission", None)
    if found is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "the service is starting", retry_after_s=1.0)
    return found


def api_key(request: Request) -> str | None:
    """The bearer key the request presents, if any."""
    return bearer_token(request.headers.get("authorization"))


def header_request_id(request: Request) -> str | None:
    """The client's valid ``X-Request-ID`` (ignored, never echoed raw, when invalid)."""
    return valid_request_id(request.headers.get("x-request-id"))


AdmissionDep = Annotated[Admission, Depends(admission)]
KeyDep = Annotated[str | None, Depends(api_key)]


@router.post(
    "/dpo/loss",
    response_model=LossResponse,
    responses=ERROR_RESPONSES,
    summary="DPO loss and per-pair statistics; with train=true also one optimizer step.",
)
async def dpo_loss(
    body: LossRequest,
    admission: AdmissionDep,
    key: KeyDep,
    header_id: Annotated[str | None, Depends(header_request_id)],
) -> LossResponse | JSONResponse:
    if body.request_id is None and header_id:
        body = body.model_copy(update={"request_id": header_id})
    ctx = request_context.get()
    if ctx is not None and body.request_id is not None:
        ctx.request_id = body.request_id  # the id the response echoes tags the log line
    try:
        with observed(admission.engine.events, "compute_loss", "http", in_flight=True) as call:
            result = await admission.compute(body, api_key=key)
            call.tokens = result.num_tokens
    except ServiceError as exc:
        return error_response(exc, current_request_id())
    if ctx is not None:
        ctx.request_id = result.request_id
    return LossResponse.model_validate(result.as_dict())


@router.post(
    "/admin/checkpoint",
    responses=ADMIN_RESPONSES,
    summary="Write a checkpoint now (API key). Returns its version, path and checksums.",
)
async def admin_checkpoint(admission: AdmissionDep, key: KeyDep) -> dict[str, Any]:
    with observed(admission.engine.events, "checkpoint", "http"):
        admission.authorize(key, privileged=True)
        return await admission.checkpoint()


@router.get(
    "/admin/checkpoints",
    responses=ADMIN_RESPONSES,
    summary="Checkpoints on disk (verified checksums) and the live weights' sha256 (API key).",
)
async def admin_checkpoints(admission: AdmissionDep, key: KeyDep) -> dict[str, Any]:
    with observed(admission.engine.events, "list_checkpoints", "http"):
        admission.authorize(key, privileged=True)
        return await admission.list_checkpoints()


@router.get("/health/live", summary="Process is up.")
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get(
    "/health/ready",
    summary="Model loaded and not draining (503 otherwise).",
    responses={503: {}},
)
async def ready(request: Request) -> JSONResponse:
    found: Admission | None = getattr(request.app.state, "admission", None)
    engine = found.engine if found is not None else None
    ok = engine is not None and engine.ready and not engine.draining
    body = {
        "status": "ready" if ok else "unavailable",
        "model_version": engine.version if engine is not None else 0,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/v1/model", response_model=ModelInfo, responses={503: {}}, summary="The model held.")
async def model_info(admission: AdmissionDep) -> ModelInfo:
    with observed(admission.engine.events, "model_info", "http"):
        return ModelInfo.model_validate(admission.engine.info().as_dict())


@router.get("/metrics", summary="Prometheus metrics.", response_class=Response)
async def metrics(admission: AdmissionDep) -> Response:
    return Response(admission.engine.events.exposition(), media_type="text/plain; version=0.0.4")
