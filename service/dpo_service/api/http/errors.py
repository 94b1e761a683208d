"""How the HTTP adapter answers a :class:`ServiceError`: the service's JSON error shape with
the status, ``Retry-After`` and ``X-Request-ID`` headers."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from dpo_service.api.common import http_status, retry_after_seconds
from dpo_service.errors import ServiceError


def error_response(exc: ServiceError, request_id: str | None = None) -> JSONResponse:
    headers = {}
    retry_after = retry_after_seconds(exc)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(exc.body(request_id), status_code=http_status(exc), headers=headers)
