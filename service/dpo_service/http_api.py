"""FastAPI adapter (thin): JSON in, :class:`Core` call, JSON out, errors mapped to statuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpo_service.core import Core, make_core
from dpo_service.errors import HTTP_STATUS, ErrorCode, ServiceError, from_validation_errors
from dpo_service.events import RequestContext, current_request_id, request_context
from dpo_service.schemas import REQUEST_ID_PATTERN, LossRequest, LossResponse, ModelInfo
from dpo_service.settings import Settings

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key (training/admin calls)."},
    409: {"description": "Stale expected_version."},
    413: {"description": "Request body too large."},
    422: {"description": "Invalid input; `errors` names each field and pair index."},
    429: {"description": "Queue full; retry after `Retry-After` seconds."},
    503: {"description": "Model loading or server draining."},
    504: {"description": "The request's deadline passed."},
}


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = ServiceError(
            ErrorCode.TOO_LARGE, f"request body is larger than {self.max_bytes} bytes"
        )
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    pass


class RequestLog:
    """ASGI middleware: a request id per request (a valid ``X-Request-ID`` or a new one) in a
    contextvar, echoed as ``X-Request-ID``, and one structured log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        ctx = RequestContext(given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex)
        token = request_context.set(ctx)
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-ID", ctx.request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "http_request method=%s path=%s status=%d duration_ms=%.1f request_id=%s",
                scope.get("method"),
                scope.get("path"),
                status,
                (time.monotonic() - started) * 1000.0,
                ctx.request_id,
            )
            request_context.reset(token)


def error_response(exc: ServiceError, request_id: str | None = None) -> JSONResponse:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(exc.body(request_id), status_code=HTTP_STATUS[exc.code], headers=headers)


def _request_id_header(request: Request) -> str | None:
    """The client's X-Request-ID when it is a valid id (else ignored: never echoed raw)."""
    value = request.headers.get("x-request-id")
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def create_app(settings: Settings | None = None, core: Core | None = None) -> FastAPI:
    """Build the FastAPI app.

    With ``core`` the caller (the combined HTTP+gRPC server) owns the engine's lifecycle.
    Without it the app builds its own core from ``settings`` and loads the model in its
    lifespan (never at import).
    """
    settings = settings or (core.settings if core is not None else Settings())
    holder: dict[str, Core] = {}
    if core is not None:
        holder["core"] = core

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if "core" in holder:
            yield
            return
        own = make_core(settings)
        holder["core"] = own
        await own.start()
        yield
        await own.engine.drain(settings.drain_timeout_s)
        await own.on_shutdown()
        await own.engine.stop()

    app = FastAPI(
        title="DPO loss service",
        version="0.1.0",
        summary="Sequence log-probs, DPO losses and online training steps for remote trainers.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog)  # outermost: 413s get an id and a log line too

    def get_core() -> Core:
        if "core" not in holder:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the service is starting", retry_after_s=1.0)
        return holder["core"]

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, _request_id_header(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(exc.errors()), _request_id_header(request))

    @app.post(
        "/dpo/loss",
        response_model=LossResponse,
        responses=ERROR_RESPONSES,
        summary="DPO loss and per-pair statistics; with train=true also one optimizer step.",
    )
    async def dpo_loss(body: LossRequest, request: Request) -> LossResponse | JSONResponse:
        core_ = get_core()
        header_id = _request_id_header(request)
        if body.request_id is None and header_id:
            body = body.model_copy(update={"request_id": header_id})
        ctx = request_context.get()
        if ctx is not None and body.request_id is not None:
            ctx.request_id = body.request_id  # the id the response echoes tags the log line
        try:
            result = await core_.compute(body, api_key=_bearer(request), protocol="http")
        except ServiceError as exc:
            return error_response(exc, body.request_id or current_request_id())
        except asyncio.CancelledError:
            raise
        if ctx is not None and result.request_id:
            ctx.request_id = result.request_id
        return result

    async def _admin(request: Request, endpoint: str, call: Any) -> dict[str, Any]:
        core_ = get_core()
        started = time.monotonic()
        code = "ok"
        try:
            core_.authorize(_bearer(request), privileged=True)
            return dict(await call(core_))
        except ServiceError as exc:
            code = exc.code.value
            raise
        finally:
            core_.engine.events.on_request(endpoint, "http", code, time.monotonic() - started)

    @app.post(
        "/admin/checkpoint",
        responses={401: {}, 404: {"description": "Checkpoints are off."}, 503: {}},
        summary="Write a checkpoint now (API key). Returns its version, path and checksums.",
    )
    async def admin_checkpoint(request: Request) -> dict[str, Any]:
        return await _admin(request, "checkpoint", lambda c: c.checkpoint())

    @app.get(
        "/admin/checkpoints",
        responses={401: {}, 404: {"description": "Checkpoints are off."}, 503: {}},
        summary="Checkpoints on disk (verified checksums) and the live weights' sha256 (API key).",
    )
    async def admin_checkpoints(request: Request) -> dict[str, Any]:
        return await _admin(request, "list_checkpoints", lambda c: c.list_checkpoints())

    @app.get("/health/live", summary="Process is up.")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get(
        "/health/ready",
        summary="Model loaded and not draining (503 otherwise).",
        responses={503: {}},
    )
    async def ready() -> JSONResponse:
        c = holder.get("core")
        ok = c is not None and c.engine.ready and not c.engine.draining
        body = {
            "status": "ready" if ok else "unavailable",
            "model_version": c.engine.version if c else 0,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/model", response_model=ModelInfo, responses={503: {}}, summary="The model held.")
    async def model_info() -> ModelInfo:
        return get_core().engine.info()

    @app.get("/metrics", summary="Prometheus metrics.", response_class=Response)
    async def metrics() -> Response:
        return Response(
            get_core().engine.events.exposition(), media_type="text/plain; version=0.0.4"
        )

    return app
