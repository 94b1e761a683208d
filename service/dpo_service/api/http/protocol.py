"""The HTTP/1.1 connection protocol the server runs: uvicorn's httptools protocol with the
limits a server facing slow or oversized clients needs, which uvicorn itself does not have.

- **Connections**: at most ``max_connections`` open; one more is answered 503 (with
  ``Retry-After``) and closed at once.
- **Header size**: request line + headers over ``max_header_bytes`` → 431, closed (counted as
  they are parsed, and as raw bytes while they are still incomplete: a header that never ends
  is never buffered past the limit).
- **Header time**: a connection's first request, and every later one from its first byte,
  must finish its headers within ``header_timeout_s`` → else 408, closed (a connection that
  sends nothing at all is closed the same way).
- **Body time**: :class:`~dpo_service.api.http.limits.BodyReader` answers a body that takes
  longer than ``body_timeout_s`` with 408; this protocol closes the connection one second
  after that in any case (a body trickling in after its response, for instance).
- A malformed request gets the service's error shape (400) instead of uvicorn's plain text.

Every answer here is the service's JSON error shape with ``Connection: close``; ``on_reject``
(the server passes a metrics hook) is told its status. Idle keep-alive connections are
uvicorn's business (``timeout_keep_alive``, 5 s).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dpo_service.api.http.errors import error_body
from dpo_service.settings import Settings

log = logging.getLogger("dpo_service.api.http")
BODY_GRACE_S = 1.0  # the protocol's body timer fires this long after BodyReader's


@dataclass(frozen=True)
class ConnectionLimits:
    """What one HTTP connection may cost (from the ``DPO_*`` settings of the same names)."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


def error_bytes(status: int, detail: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response in the service's shape, closing the connection."""
    body = json.dumps(error_body(status, detail)).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Refused(Exception):
    """Raised from a parser callback: stops httptools mid-request."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with the limits of the module docstring; use
    :func:`guarded_protocol` to make the class a server runs."""

    limits: ClassVar[ConnectionLimits]
    hooks: ClassVar[tuple[Callable[[int], None], ...]] = ()  # told the status of each refusal

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = 0  # request line + headers parsed so far
        self._raw_header_bytes = 0  # bytes fed while the headers were still incomplete
        self._refusal: tuple[int, str] | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self.limits.max_connections:
            self.transport = transport
            self._refuse(503, "too many open connections; retry later", retry_after=1)
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self.transport.is_closing():
            return
        super().data_received(data)  # a callback's _Refused ends in send_400_response
        if self._in_headers and self._refusal is None and not self.transport.is_closing():
            self._raw_header_bytes += len(data)
            if self._raw_header_bytes > self.limits.max_header_bytes:
                self._refuse(431, self._too_large())

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = self._raw_header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(
            self.limits.body_timeout_s + BODY_GRACE_S, self._body_timeout
        )

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()  # the next request's first byte: on_message_begin

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # a limit stopped the parser: answer that
            status, detail = self._refusal
            self._refusal = None
            self._refuse(status, detail)
            return
        self._refuse(400, f"malformed HTTP request: {msg}")

    # ---------------------------------------------------------------- limits
    def _too_large(self) -> str:
        return f"the request line and headers are larger than {self.limits.max_header_bytes} bytes"

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self._refusal = (431, self._too_large())
            raise _Refused()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_s, self._header_timeout
        )

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._in_headers or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is still being written: just end it
            return
        timeout = self.limits.header_timeout_s
        self._refuse(408, f"the request headers did not arrive within {timeout:g} s")

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_started:
            self.transport.close()
            return
        timeout = self.limits.body_timeout_s
        self._refuse(408, f"the request body did not arrive within {timeout:g} s")

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _refuse(self, status: int, detail: str, retry_after: int | None = None) -> None:
        """Answer ``status`` and close; nothing more is read from this connection."""
        self._refusal = (status, detail)
        self._cancel_timers()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, detail, retry_after))
            self.transport.close()
        client = self.client or ("-", 0)
        log.info(
            "http_rejected status=%d client=%s:%s detail=%s", status, client[0], client[1], detail
        )
        for hook in self.hooks:
            hook(status)


def guarded_protocol(
    limits: ConnectionLimits, on_reject: Callable[[int], None] | None = None
) -> type[GuardedHttpProtocol]:
    """A :class:`GuardedHttpProtocol` class bound to ``limits`` (for ``uvicorn.Config(http=)``)."""
    return type(
        "BoundGuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {"limits": limits, "hooks": (on_reject,) if on_reject is not None else ()},
    )
