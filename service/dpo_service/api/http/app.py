"""The FastAPI app of the HTTP adapter: routes (:mod:`.routes`), middleware (:mod:`.middleware`,
:mod:`.limits`) and the handlers that give every error the service's JSON shape, the
framework's own (404, 405, a failed body parse) included."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from dpo_service.api.common import current_request_id
from dpo_service.api.http.errors import error_response, http_error_response
from dpo_service.api.http.limits import BodyReader, KeyGate
from dpo_service.api.http.middleware import RequestLog
from dpo_service.api.http.routes import router
from dpo_service.api.http.sessions import router as sessions_router
from dpo_service.engine.admission import Admission, make_admission
from dpo_service.engine.events import EngineEvents
from dpo_service.errors import ServiceError, from_validation_errors
from dpo_service.schemas import LossRequest
from dpo_service.settings import Settings


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc, current_request_id())


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(from_validation_errors(exc.errors()), current_request_id())


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """404, 405 and the framework's other HTTP errors, in the service's shape."""
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return http_error_response(
        exc.status_code,
        detail,
        headers=dict(exc.headers or {}),
        request_id=current_request_id(),
    )


def _events_of(scope: Scope) -> EngineEvents | None:
    app = scope.get("app")
    admission: Admission | None = getattr(getattr(app, "state", None), "admission", None)
    return admission.engine.events if admission is not None else None


def _documented_bodies(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` plus the request models the endpoints parse themselves (referenced
    from ``openapi_extra``), so the schema still documents every body field."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        models = schema.setdefault("components", {}).setdefault("schemas", {})
        loss = LossRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in loss.pop("$defs", {}).items():
            models.setdefault(name, definition)
        models["LossRequest"] = loss
        app.openapi_schema = schema
        return schema

    return openapi


def create_app(settings: Settings | None = None, admission: Admission | None = None) -> FastAPI:
    """Build the FastAPI app.

    With ``admission`` the caller (the combined HTTP+gRPC server) owns the
    engine's lifecycle. Without it the app builds its own from ``settings`` and loads the model
    in its lifespan (never at import).
    """
    settings = settings or (admission.settings if admission is not None else Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if admission is not None:
            yield
            return
        own = make_admission(settings)
        app.state.admission = own
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
    app.state.admission = admission
    # outermost last: RequestLog → KeyGate → BodyReader → routes
    app.add_middleware(
        BodyReader, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    app.add_middleware(KeyGate)
    app.add_middleware(RequestLog, events=_events_of)  # every answer gets an id and a log line
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    app.include_router(sessions_router)  # issue 12: /v1/sessions
    app.openapi = _documented_bodies(app)  # type: ignore[method-assign]
    return app
