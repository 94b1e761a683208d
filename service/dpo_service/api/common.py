"""What both protocol adapters share: bearer keys, the request-id policy, the one metrics and
timing helper for every endpoint, and the error → status mapping.

- Keys: ``Authorization: Bearer <KEY>`` (HTTP header, gRPC metadata), scheme case-insensitive.
- Request ids: a client's ``X-Request-ID`` (header or metadata) is used when it matches
  :data:`~dpo_service.schemas.REQUEST_ID_PATTERN`, else a new one is made; it is never echoed
  raw. The id tags log lines through :data:`request_context`.
- Metrics: :func:`observed` counts each call once by endpoint, protocol and result code
  (``ok``, a :class:`ErrorCode` value, ``cancelled`` when the caller went away) and records
  its latency; tokens are added only for calls that succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dpo_service.engine.events import EngineEvents
from dpo_service.errors import GRPC_STATUS, HTTP_STATUS, ErrorCode, ServiceError, from_pydantic
from dpo_service.schemas import REQUEST_ID_PATTERN, LossRequest

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
REQUEST_ID_HEADER = "x-request-id"


# ------------------------------------------------------------------------------ keys
def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (None for other schemes)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ------------------------------------------------------------------------------ request ids
def valid_request_id(value: str | None) -> str | None:
    """``value`` when it is an acceptable request id, else None."""
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class RequestContext:
    """The id of the request being served; adapters set it, log lines carry it. Mutable so an
    endpoint can adopt the id the response echoes (body ``request_id`` or server-assigned)."""

    request_id: str


request_context: ContextVar[RequestContext | None] = ContextVar("dpo_request", default=None)


def current_request_id() -> str | None:
    ctx = request_context.get()
    return None if ctx is None else ctx.request_id


# ------------------------------------------------------------------------------ metrics
@dataclass
class CallRecord:
    """What :func:`observed` records for one call; the endpoint sets ``tokens`` on success."""

    code: str = "ok"
    tokens: int = 0


@contextlib.contextmanager
def observed(
    events: EngineEvents, endpoint: str, protocol: str, *, in_flight: bool = False
) -> Iterator[CallRecord]:
    """Count one call of ``endpoint`` with its result code and latency (and, with
    ``in_flight``, hold the in-flight gauge while it runs). A :class:`ServiceError` is counted
    with its code, a cancelled call as ``cancelled``, any other exception as ``internal``."""
    record = CallRecord()
    started = time.monotonic()
    if in_flight:
        events.in_flight.inc()
    try:
        yield record
    except ServiceError as exc:
        record.code = exc.code.value
        raise
    except (asyncio.CancelledError, GeneratorExit):
        record.code = "cancelled"
        raise
    except Exception:
        record.code = ErrorCode.INTERNAL.value
        raise
    finally:
        if in_flight:
            events.in_flight.dec()
        tokens = record.tokens if record.code == "ok" else 0
        events.on_request(endpoint, protocol, record.code, time.monotonic() - started, tokens)


# ------------------------------------------------------------------------------ bodies
def parse_loss_request(raw: dict[str, Any]) -> LossRequest:
    """A REST-shaped body as the validated :class:`LossRequest` (422 naming each field
    otherwise); the gRPC adapter's route to the same validation FastAPI runs for HTTP."""
    try:
        return LossRequest.model_validate(raw)
    except ValidationError as exc:
        raise from_pydantic(exc) from None


# ------------------------------------------------------------------------------ errors
def http_status(exc: ServiceError) -> int:
    return HTTP_STATUS[exc.code]


def grpc_status_name(exc: ServiceError) -> str:
    """The ``grpc.StatusCode`` member name for ``exc``."""
    return GRPC_STATUS[exc.code]


def retry_after_seconds(exc: ServiceError) -> int | None:
    """Whole seconds a client should wait before retrying (``Retry-After`` header / trailer):
    the error's own hint, else 1 s for overload and unavailability, else None."""
    if exc.retry_after_s is not None:
        return max(1, round(exc.retry_after_s))
    if exc.code in (ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE):
        return 1
    return None
