"""The FastAPI app of the HTTP adapter: routes (:mod:`.routes`), middleware
(:mod:`.middleware`) and the handlers that give every error the service's JSON shape."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dpo_service.api.common import valid_request_id
from dpo_service.api.http.errors import error_response
from dpo_service.api.http.middleware import BodyLimit, RequestLog
from dpo_service.api.http.routes import router
from dpo_service.engine.admission import Admission, make_admission
from dpo_service.errors import ServiceError, from_validation_errors
from dpo_service.settings import Settings


def _header_id(request: Request) -> str | None:
    return valid_request_id(request.headers.get("x-request-id"))


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc, _header_id(request))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(from_validation_errors(exc.errors()), _header_id(request))


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
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLog)  # outermost: 413s get an id and a log line too
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(router)
    return app
