"""The service's error vocabulary, shared by the HTTP and gRPC adapters.

Every failure a caller can cause is a :class:`ServiceError` with an :class:`ErrorCode`; each
adapter maps the code to its protocol's status (the same case gets the same class on both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import ValidationError


class ErrorCode(str, Enum):
    """Error classes, each with one HTTP status and one gRPC status code name."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CONFLICT = "conflict"
    CANCELLED = "cancelled"  # never raised by the server: the client's code for a call it cancelled
    NOT_FOUND = "not_found"
    INTERNAL = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 422,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CONFLICT: 409,
    ErrorCode.CANCELLED: 499,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INTERNAL: 500,
}

# gRPC status names (grpc.StatusCode.<name>); kept as strings so this module needs no grpc.
GRPC_STATUS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    ErrorCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    ErrorCode.TOO_LARGE: "RESOURCE_EXHAUSTED",
    ErrorCode.OVERLOADED: "RESOURCE_EXHAUSTED",
    ErrorCode.UNAVAILABLE: "UNAVAILABLE",
    ErrorCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    ErrorCode.CONFLICT: "ABORTED",
    ErrorCode.CANCELLED: "CANCELLED",
    ErrorCode.NOT_FOUND: "NOT_FOUND",
    ErrorCode.INTERNAL: "INTERNAL",
}


@dataclass(frozen=True)
class FieldError:
    """One problem with one field, e.g. ``pairs[2].chosen_ids[5]``."""

    field: str
    message: str


@dataclass
class ServiceError(Exception):
    """A failure with a protocol-neutral code, a message and optional field details."""

    code: ErrorCode
    message: str
    errors: list[FieldError] = field(default_factory=list)
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON error body the HTTP adapter returns."""
        out: dict[str, Any] = {
            "code": self.code.value,
            "detail": self.message,
            "errors": [{"field": e.field, "message": e.message} for e in self.errors],
        }
        if request_id is not None:
            out["request_id"] = request_id
        return out


def invalid(field_name: str, message: str) -> ServiceError:
    """A 422 / INVALID_ARGUMENT naming one field."""
    return ServiceError(
        ErrorCode.INVALID_ARGUMENT,
        f"{field_name}: {message}",
        [FieldError(field_name, message)],
    )


#: Tags of the request's other unions (schemas: conversations, loss lists), left out of locs.
_UNION_TAGS = ("ConversationPair", "conversation", "message_list", "one_loss", "loss_list")


def format_loc(loc: Sequence[int | str]) -> str:
    """``("body", "pairs", 2, "chosen")`` → ``pairs[2].chosen``."""
    out = ""
    for part in loc:
        if part in ("body", "query") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # Union members show up as class names in pydantic locs; they add nothing.
            if part in ("TextPair", "TokenPair", "text", "tokens", *_UNION_TAGS):
                continue
            out += f".{part}" if out else str(part)
    return out or "body"


def from_validation_errors(raw_errors: Sequence[Any]) -> ServiceError:
    """Turn pydantic/FastAPI error dicts into one INVALID_ARGUMENT error."""
    errors = []
    for err in raw_errors:
        loc = err.get("loc", ()) if isinstance(err, dict) else ()
        msg = err.get("msg", "invalid value") if isinstance(err, dict) else str(err)
        errors.append(FieldError(format_loc(loc), str(msg)))
    # de-duplicate while keeping order (union members repeat the same complaint)
    seen: set[tuple[str, str]] = set()
    unique = []
    for e in errors:
        if (e.field, e.message) not in seen:
            seen.add((e.field, e.message))
            unique.append(e)
    summary = "; ".join(f"{e.field}: {e.message}" for e in unique[:5])
    if len(unique) > 5:
        summary += f"; … ({len(unique) - 5} more)"
    return ServiceError(ErrorCode.INVALID_ARGUMENT, summary or "invalid request", unique)


def from_pydantic(exc: ValidationError) -> ServiceError:
    """Turn a pydantic ``ValidationError`` into an INVALID_ARGUMENT ServiceError."""
    return from_validation_errors(exc.errors(include_url=False, include_input=False))
