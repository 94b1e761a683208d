"""How the HTTP adapter answers an error: always the service's JSON shape
``{"code", "detail", "errors"}``, with the status, ``Retry-After`` and ``X-Request-ID``
headers. A :class:`ServiceError` brings its own code; a rejection by the HTTP layer itself (an
unknown path, a wrong method, an unsupported media type, a slow or oversized request) gets the
code :data:`HTTP_CODES` names for its status.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from dpo_service.api.common import http_status, retry_after_seconds
from dpo_service.errors import HTTP_STATUS, ServiceError

#: The ``code`` of an error answered by the HTTP layer (also the metrics' ``code`` label).
HTTP_CODES: dict[int, str] = {
    **{status: code.value for code, status in HTTP_STATUS.items()},
    400: "invalid_argument",
    405: "method_not_allowed",
    408: "request_timeout",
    415: "unsupported_media_type",
    431: "too_large",
}


def code_for_status(status: int) -> str:
    """The service's error code for an HTTP status (``ok`` below 400)."""
    if status < 400:
        return "ok"
    return HTTP_CODES.get(status, "internal" if status >= 500 else "invalid_argument")


def error_body(status: int, detail: str, request_id: str | None = None) -> dict[str, object]:
    """The service's error shape for an error of the HTTP layer (no field details)."""
    body: dict[str, object] = {"code": code_for_status(status), "detail": detail, "errors": []}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_response(exc: ServiceError, request_id: str | None = None) -> JSONResponse:
    headers = {}
    retry_after = retry_after_seconds(exc)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(exc.body(request_id), status_code=http_status(exc), headers=headers)


def http_error_response(
    status: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
    close: bool = False,
) -> JSONResponse:
    """An error of the HTTP layer in the service's shape; ``close`` ends the connection after
    it (the request body was not read, so the connection cannot be reused)."""
    out = dict(headers or {})
    if request_id:
        out["X-Request-ID"] = request_id
    if close:
        out["Connection"] = "close"
    return JSONResponse(error_body(status, detail, request_id), status_code=status, headers=out)
