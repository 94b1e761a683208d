"""ASGI middleware that guards what a request may cost before any endpoint sees it.

- :class:`KeyGate`: with ``DPO_REQUIRE_KEY_FOR_LOSS`` the key of ``POST /dpo/loss`` is checked
  before its body is read (401 before any validation detail, and before any byte is buffered);
  two ``Authorization`` values are a 401 on every path.
- :class:`BodyReader`: a request body is read whole, before routing, within
  ``DPO_MAX_BODY_BYTES`` (413, declared or streamed, chunked included) and
  ``DPO_BODY_TIMEOUT_S`` (408); a body with a ``Content-Encoding`` or a ``Content-Type`` the
  service does not read is a 415. The endpoint then gets the body at once, and the
  connection's next event is its ``http.disconnect`` (which the endpoints watch).

Every rejection has the service's error shape and closes the connection (its body is unread).
"""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpo_service.api.common import bearer_token, current_request_id, single_value
from dpo_service.api.http.errors import error_response, http_error_response
from dpo_service.errors import ServiceError

LOSS_PATH = "/dpo/loss"


class KeyGate:
    """401 before the body is read: duplicate ``Authorization`` values anywhere, and a
    missing/bad key on ``POST /dpo/loss`` when the key is required for loss calls too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            key = bearer_token(single_value(headers.getlist("authorization"), "Authorization"))
            admission = getattr(scope["app"].state, "admission", None) if "app" in scope else None
            if admission is not None and scope["path"] == LOSS_PATH:
                admission.authorize_loss_call(key)  # a no-op unless the key is required
        except ServiceError as exc:
            response = error_response(exc, current_request_id())
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _has_body(headers: Headers) -> bool:
    declared = headers.get("content-length")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    return chunked or (declared is not None and declared.strip() not in ("", "0"))


def _unsupported_media(headers: Headers) -> str | None:
    """Why the body cannot be read (415), or None."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return (
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed "
            "(or with Content-Encoding: identity)"
        )
    content_type = headers.get("content-type")
    if content_type is None:
        return None  # read as JSON, as most JSON clients expect
    media, _, params = content_type.partition(";")
    kind, _, subtype = media.strip().lower().partition("/")
    charset = ""
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    json_type = kind == "application" and (subtype == "json" or subtype.endswith("+json"))
    if not json_type:
        return f"Content-Type {media.strip()!r} is not supported: send application/json"
    if charset not in ("", "utf-8", "utf8"):
        return f"charset {charset!r} is not supported: JSON bodies are UTF-8"
    return None


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Gone(Exception):
    """The client disconnected while sending its body."""


class BodyReader:
    """Read the whole body first, within the size and time limits; see the module docstring."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not _has_body(headers):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(headers, receive)
        except _Refused as exc:
            response = http_error_response(
                exc.status, exc.detail, request_id=current_request_id(), close=True
            )
            await response(scope, receive, send)
            return
        except _Gone:
            return  # nobody to answer
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the next event: http.disconnect

        await self.app(scope, replay, send)

    async def _read(self, headers: Headers, receive: Receive) -> bytes:
        media = _unsupported_media(headers)
        if media is not None:
            raise _Refused(415, media)
        declared = headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise _Refused(413, f"request body is larger than {self.max_bytes} bytes")
        deadline = time.monotonic() + self.timeout_s
        chunks: list[bytes] = []
        seen = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise _Refused(
                    408, f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise _Refused(413, f"request body is larger than {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
