"""ASGI middleware of the HTTP adapter: the body size limit, and request ids with one
structured log line per request."""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpo_service.api.common import (
    REQUEST_ID_HEADER,
    RequestContext,
    new_request_id,
    request_context,
    valid_request_id,
)
from dpo_service.errors import ErrorCode, ServiceError

log = logging.getLogger("dpo_service.api.http")


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over ``max_bytes`` (declared or streamed)."""

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


class RequestLog:
    """A request id per request (a valid ``X-Request-ID`` or a new one) in
    :data:`~dpo_service.api.common.request_context`, echoed as ``X-Request-ID``, and one
    structured log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"")
        ctx = RequestContext(valid_request_id(given.decode("latin-1")) or new_request_id())
        token = request_context.set(ctx)
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
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
