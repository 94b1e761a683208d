"""ASGI middleware of the HTTP adapter: request ids and one structured log line per request
(the access log: uvicorn's own is off), and the metric of every rejection no endpoint counted.

Log levels: successful ``/health/*`` and ``/metrics`` requests (probes and scrapes) at DEBUG,
everything else, failing probes included, at INFO. The body limits live in :mod:`.limits`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpo_service.api.common import (
    REQUEST_ID_HEADER,
    RequestContext,
    new_request_id,
    request_context,
    valid_request_id,
)
from dpo_service.api.http.errors import code_for_status
from dpo_service.engine.events import EngineEvents

log = logging.getLogger("dpo_service.api.http")

#: Metric ``endpoint`` label of each path (anything else is ``unknown``: bounded labels).
ENDPOINTS = {
    "/dpo/loss": "compute_loss",
    "/admin/checkpoint": "checkpoint",
    "/admin/checkpoints": "list_checkpoints",
    "/v1/model": "model_info",
    "/health/live": "health",
    "/health/ready": "health",
    "/metrics": "metrics",
}
_QUIET_PREFIXES = ("/health/", "/metrics")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class RequestLog:
    """A request id per request (a valid ``X-Request-ID`` or a new one) in
    :data:`~dpo_service.api.common.request_context`, echoed as ``X-Request-ID``; one structured
    log line per request; and, for an error answered before any endpoint counted the call
    (unknown path, wrong method, 401/413/415/408 of the guards, a failed dependency), one
    ``dpo_requests_total`` sample with its code."""

    def __init__(self, app: ASGIApp, events: Callable[[Scope], EngineEvents | None]) -> None:
        self.app = app
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"")
        traced = valid_request_id(given.decode("latin-1"))
        ctx = RequestContext(traced or new_request_id(), traced=traced is not None)
        token = request_context.set(ctx)
        started = time.monotonic()
        status = 0  # no answer yet

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
        except BaseException as exc:
            if status == 0:  # uvicorn answers 500; a cancelled request is answered by nobody
                status = 499 if isinstance(exc, asyncio.CancelledError) else 500
            raise
        finally:
            if status == 0:  # returned without answering: the client went away (499)
                status = 499
            seconds = time.monotonic() - started
            self._count(scope, ctx, status, seconds)
            path = str(scope.get("path", ""))
            quiet = status < 400 and path.startswith(_QUIET_PREFIXES)
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "http_request method=%s path=%s status=%d duration_ms=%.1f request_id=%s client=%s",
                scope.get("method"),
                path,
                status,
                seconds * 1000.0,
                ctx.request_id,
                _client(scope),
            )
            request_context.reset(token)

    def _count(self, scope: Scope, ctx: RequestContext, status: int, seconds: float) -> None:
        if ctx.counted or status < 400:
            return
        events = self.events(scope)
        if events is not None:
            endpoint = ENDPOINTS.get(str(scope.get("path", "")), "unknown")
            events.on_request(endpoint, "http", code_for_status(status), seconds)
