"""The HTTP endpoints, on one :class:`APIRouter`. The admission control and the bearer key
come in as dependencies; each endpoint is a thin call into the engine's admission.

``POST /dpo/loss`` reads its body itself (already buffered by
:class:`~dpo_service.api.http.limits.BodyReader`) and parses and validates it off the event
loop; the OpenAPI schema still documents it (``openapi_extra``, the app adds the models). While
the request is queued or computed, the endpoint watches its connection: a client that goes
away cancels its work, which is then dropped before the model (counted ``cancelled``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from dpo_service.api.common import (
    RequestContext,
    bearer_token,
    current_request_id,
    observed,
    parse_loss_json,
    request_context,
    single_value,
)
from dpo_service.api.http.errors import error_response
from dpo_service.engine.admission import Admission
from dpo_service.engine.results import LossResult
from dpo_service.engine.sessions.service import session_fields
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.schemas import LossRequest, LossResponse, ModelInfo

T = TypeVar("T")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key (training/admin calls)."},
    404: {"description": "No such session (`session`; issue 12)."},
    408: {"description": "The request body did not arrive in time."},
    409: {"description": "Stale expected_version, or a request_id reused for another request."},
    413: {"description": "Request body too large."},
    415: {"description": "Content-Type or Content-Encoding the service does not read."},
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
LOSS_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LossRequest"}}},
    }
}

router = APIRouter()


def admission(request: Request) -> Admission:
    """The app's admission control (503 until the app has one)."""
    found: Admission | None = getattr(request.app.state, "admission", None)
    if found is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "the service is starting", retry_after_s=1.0)
    return found


def api_key(request: Request) -> str | None:
    """The bearer key the request presents, if any (two ``Authorization`` headers: 401)."""
    return bearer_token(single_value(request.headers.getlist("authorization"), "Authorization"))


AdmissionDep = Annotated[Admission, Depends(admission)]
KeyDep = Annotated[str | None, Depends(api_key)]


class ClientGone(Exception):
    """The HTTP client closed its connection before the answer was ready."""


async def _disconnected(request: Request) -> None:
    """Returns when the client's connection closes (the body was read already)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the connection cannot be watched: never report a disconnect
        await asyncio.get_running_loop().create_future()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, but cancel it (and raise :class:`ClientGone`) if the client goes away
    first: its queued work is then dropped before the model, as over gRPC."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientGone()
    return task.result()  # it finished first: its result, or its ServiceError


async def _loss(
    raw: bytes, admission: Admission, key: str | None, ctx: RequestContext | None
) -> LossResult:
    settings = admission.settings

    def parse() -> LossRequest:  # off the event loop, once the request is accepted
        body = parse_loss_json(
            raw,
            max_pairs=settings.max_pairs_per_request,
            max_request_tokens=settings.max_request_tokens,
        )
        if ctx is not None:
            ctx.adopt(body.request_id)  # the id the response echoes tags the log line
        return body

    with observed(admission.engine.events, "compute_loss", "http", in_flight=True) as call:
        result = await admission.compute(parse, api_key=key)
        call.tokens = result.num_tokens
        return result


@router.post(
    "/dpo/loss",
    response_model=LossResponse,
    responses=ERROR_RESPONSES,
    summary="DPO loss and per-pair statistics; with train=true also one optimizer step.",
    openapi_extra=LOSS_REQUEST_BODY,
)
async def dpo_loss(
    request: Request, admission: AdmissionDep, key: KeyDep
) -> LossResponse | JSONResponse:
    ctx = request_context.get()
    raw = await request.body()
    try:
        result = await unless_disconnected(request, _loss(raw, admission, key, ctx))
    except ServiceError as exc:
        return error_response(exc, current_request_id())
    except ClientGone:  # nobody reads this answer; the access log shows 499
        gone = ServiceError(ErrorCode.CANCELLED, "the client closed the connection")
        return error_response(gone, current_request_id())
    if ctx is not None:
        ctx.adopt(result.request_id)
    return LossResponse.model_validate({**result.as_dict(), **session_fields(result)})


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
    reason = engine.durability.reason if engine is not None else None
    body: dict[str, Any] = {
        "status": "ready" if ok else "unavailable",
        "model_version": engine.version if engine is not None else 0,
        # a failed due checkpoint pauses training; loss-only requests are served, so the
        # status stays 200 and this detail says why train requests get 503
        "degraded": reason is not None,
    }
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/v1/model", response_model=ModelInfo, responses={503: {}}, summary="The model held.")
async def model_info(admission: AdmissionDep) -> ModelInfo:
    with observed(admission.engine.events, "model_info", "http"):
        return ModelInfo.model_validate(admission.engine.info().as_dict())


@router.get("/metrics", summary="Prometheus metrics.", response_class=Response)
async def metrics(admission: AdmissionDep) -> Response:
    return Response(admission.engine.events.exposition(), media_type="text/plain; version=0.0.4")
