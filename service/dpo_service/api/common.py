"""What both protocol adapters share: bearer keys, the request-id policy, the one metrics and
timing helper for every endpoint, and the error → status mapping.

- Keys: ``Authorization: Bearer <KEY>`` (HTTP header, gRPC metadata), scheme case-insensitive;
  more than one ``Authorization`` value is refused (UNAUTHENTICATED), never guessed between.
- Request ids: two different things. The idempotency key of a train request is the body's
  ``request_id`` (gRPC: the message's), and nothing else. A client's ``X-Request-ID`` header
  is a *tracing* id: echoed in the response header and the log line when it matches
  :data:`~dpo_service.schemas.REQUEST_ID_PATTERN` (else a new one is made; never echoed raw),
  never used as an idempotency key. The id tags log lines through :data:`request_context`.
- Metrics: :func:`observed` counts each call once by endpoint, protocol and result code
  (``ok``, a :class:`ErrorCode` value, ``cancelled`` when the caller went away) and records
  its latency; tokens are added only for calls that succeeded. Rejections that never reach
  an endpoint (framework errors) are counted by the HTTP access log middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dpo_service.engine.events import EngineEvents
from dpo_service.errors import (
    GRPC_STATUS,
    HTTP_STATUS,
    ErrorCode,
    ServiceError,
    from_pydantic,
    invalid,
)
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
    endpoint can adopt the id the response echoes (body ``request_id`` or server-assigned)
    when the client sent no tracing id (``traced``). ``counted``: :func:`observed` counted
    the call already."""

    request_id: str
    traced: bool = False
    counted: bool = False

    def adopt(self, request_id: str | None) -> None:
        """Tag the log line with ``request_id`` unless the client chose a tracing id."""
        if request_id is not None and not self.traced:
            self.request_id = request_id


request_context: ContextVar[RequestContext | None] = ContextVar("dpo_request", default=None)


def current_request_id() -> str | None:
    ctx = request_context.get()
    return None if ctx is None else ctx.request_id


# ------------------------------------------------------------------------------ metrics
@dataclass
class CallRecord:
    """What :func:`observed` records for one call; the endpoint sets ``tokens`` on success
    and, when the caller has one, its ``deadline`` (``time.monotonic()``): a call cancelled
    at its deadline (gRPC cancels it) is counted ``deadline_exceeded``, as the caller saw."""

    code: str = "ok"
    tokens: int = 0
    deadline: float | None = None


@contextlib.contextmanager
def observed(
    events: EngineEvents, endpoint: str, protocol: str, *, in_flight: bool = False
) -> Iterator[CallRecord]:
    """Count one call of ``endpoint`` with its result code and latency (and, with
    ``in_flight``, hold the in-flight gauge while it runs). A :class:`ServiceError` is counted
    with its code, a cancelled call as ``cancelled``, any other exception as ``internal``."""
    record = CallRecord()
    started = time.monotonic()
    ctx = request_context.get()
    if ctx is not None:
        ctx.counted = True
    if in_flight:
        events.in_flight.inc()
    try:
        yield record
    except ServiceError as exc:
        record.code = exc.code.value
        raise
    except (asyncio.CancelledError, GeneratorExit):
        late = record.deadline is not None and time.monotonic() >= record.deadline - 0.05
        record.code = ErrorCode.DEADLINE_EXCEEDED.value if late else "cancelled"
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
    otherwise); the gRPC adapter's route to the same validation as ``POST /dpo/loss``."""
    try:
        return LossRequest.model_validate(raw)
    except ValidationError as exc:
        raise from_pydantic(exc) from None


_PROMPT_KEY = re.compile(rb'"prompt(?:_ids)?"\s*:')
_IDS_KEY = re.compile(rb'"(?:prompt|chosen|rejected)_ids"\s*:\s*\[\s*(\]?)')


def check_json_size(raw: bytes, *, max_pairs: int, max_request_tokens: int) -> None:
    """Refuse (422) a JSON body with more pairs (``prompt`` / ``prompt_ids`` keys) or token
    ids (elements of the ``*_ids`` arrays) than the limits, by scanning its bytes, before any
    of it is parsed into Python objects. In valid JSON a quote inside a string is escaped, so
    these patterns only match keys; anything the scan cannot read is left to the parser."""
    pairs = sum(1 for _ in _PROMPT_KEY.finditer(raw))
    if pairs > max_pairs:
        raise invalid("pairs", f"{pairs} pairs, more than the limit of {max_pairs}")
    total = 0
    for match in _IDS_KEY.finditer(raw):
        if match.group(1):
            continue  # []
        end = raw.find(b"]", match.end())
        if end < 0:
            return
        total += raw.count(b",", match.end(), end) + 1
    if total > max_request_tokens:
        raise invalid(
            "pairs", f"the request has {total} tokens, more than the limit of {max_request_tokens}"
        )


def parse_loss_json(raw: bytes, *, max_pairs: int, max_request_tokens: int) -> LossRequest:
    """The JSON body of ``POST /dpo/loss`` as a :class:`LossRequest`: the size scan
    (:func:`check_json_size`), then one pass that parses and validates (strict JSON types;
    unparsable JSON, invalid UTF-8 and unpaired surrogates are 422 too). CPU-bound: the HTTP
    adapter runs it off the event loop."""
    check_json_size(raw, max_pairs=max_pairs, max_request_tokens=max_request_tokens)
    try:
        return LossRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise from_pydantic(exc) from None


# ------------------------------------------------------------------------------ keys
def single_value(values: Sequence[str], name: str) -> str | None:
    """The one value of a header / metadata key, None when absent; two or more are refused
    (an ``Authorization`` that says two things is not guessed between)."""
    if len(values) > 1:
        raise ServiceError(ErrorCode.UNAUTHENTICATED, f"more than one {name} value")
    return values[0] if values else None


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
