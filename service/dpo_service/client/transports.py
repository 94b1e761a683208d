"""Wire transports of :mod:`dpo_service.client`: REST (httpx) and gRPC (sync channel).

Each turns one call into one request and maps every failure to a :class:`DpoClientError`
carrying the service's :class:`ErrorCode` (from the body's ``code`` / the ``dpo-error-code``
trailer, else from the protocol status). Retries are the client's business, not theirs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import grpc
import httpx

from dpo_service.api.grpc.convert import (
    ERROR_CODE_FROM_PROTO,
    model_info_from_proto,
    request_from_dict,
    response_from_proto,
)
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.errors import HTTP_STATUS, ErrorCode

CHECKPOINT_PATH = "/admin/checkpoint"
_HTTP_TO_CODE = {
    status: code for code, status in HTTP_STATUS.items() if code is not ErrorCode.CANCELLED
}
_GRPC_TO_CODE: dict[grpc.StatusCode, ErrorCode] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: ErrorCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: ErrorCode.UNAUTHENTICATED,
    grpc.StatusCode.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED: ErrorCode.CONFLICT,
    grpc.StatusCode.CANCELLED: ErrorCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND: ErrorCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED: ErrorCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorCode.NOT_FOUND,
}


class DpoClientError(Exception):
    """A failed call: the service's error class, its message and the protocol status
    (HTTP status code, or the ``grpc.StatusCode`` name; ``None`` if nothing was answered)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        status: int | str | None = None,
        *,
        retry_after_s: float | None = None,
        errors: Sequence[tuple[str, str]] = (),
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        self.errors = list(errors)  # (field, message), e.g. ("pairs[2].chosen_ids[5]", "...")
        self.attempts = attempts


class Transport(Protocol):
    def compute_loss(self, body: dict[str, Any], timeout: float | None) -> dict[str, Any]: ...
    def model_info(self, timeout: float | None) -> dict[str, Any]: ...
    def checkpoint(self, timeout: float | None) -> dict[str, Any]: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------- HTTP
def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class HttpTransport:
    """REST over httpx."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _send(self, method: str, path: str, timeout: float | None, **kw: Any) -> dict[str, Any]:
        try:
            r = self._client.request(method, path, timeout=timeout, **kw)
        except httpx.TimeoutException as exc:
            raise DpoClientError(ErrorCode.DEADLINE_EXCEEDED, f"no answer in time: {exc}") from exc
        except httpx.TransportError as exc:
            raise DpoClientError(ErrorCode.UNAVAILABLE, f"connection failed: {exc!r}") from exc
        if r.is_success:
            return dict(r.json())
        try:
            body = r.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        try:
            code = ErrorCode(body.get("code"))
        except ValueError:
            default = ErrorCode.INTERNAL if r.status_code >= 500 else ErrorCode.INVALID_ARGUMENT
            code = _HTTP_TO_CODE.get(r.status_code, default)
        detail = body.get("detail")
        errors = [(e.get("field", ""), e.get("message", "")) for e in body.get("errors") or []]
        raise DpoClientError(
            code,
            detail if isinstance(detail, str) else (r.text[:500] or r.reason_phrase),
            r.status_code,
            retry_after_s=_retry_after(r.headers.get("retry-after")),
            errors=errors,
        )

    def compute_loss(self, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if body.get("request_id"):
            headers["X-Request-ID"] = str(body["request_id"])
        # allow_nan: a NaN/inf beta is the server's to reject (422), as over gRPC
        content = json.dumps(body, allow_nan=True).encode("utf-8")
        return self._send("POST", "/dpo/loss", timeout, content=content, headers=headers)

    def model_info(self, timeout: float | None) -> dict[str, Any]:
        return self._send("GET", "/v1/model", timeout)

    def checkpoint(self, timeout: float | None) -> dict[str, Any]:
        return self._send("POST", CHECKPOINT_PATH, timeout)

    def close(self) -> None:
        self._client.close()


# ---------------------------------------------------------------------------- gRPC
def _grpc_error(exc: grpc.RpcError) -> DpoClientError:
    status = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(status)
    trailers = dict(exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else {}
    code = _GRPC_TO_CODE.get(status, ErrorCode.INTERNAL)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        code = ErrorCode.TOO_LARGE if "larger than max" in details else ErrorCode.OVERLOADED
    with contextlib.suppress(ValueError):
        code = ErrorCode(trailers.get("dpo-error-code", code.value))
    errors: list[tuple[str, str]] = []
    raw = trailers.get("dpo-error-bin")
    if isinstance(raw, bytes):
        try:
            detail = pb.Error.FromString(raw)
            errors = [(v.field, v.description) for v in detail.field_violations]
        except Exception:  # details are best effort
            pass
    retry = trailers.get("retry-after")
    return DpoClientError(
        code,
        details,
        status.name,
        retry_after_s=_retry_after(retry if isinstance(retry, str) else None),
        errors=errors,
    )


def stream_error(err: pb.Error) -> DpoClientError:
    """A stream answer's ``Error`` as a :class:`DpoClientError`."""
    code = ERROR_CODE_FROM_PROTO.get(err.code, ErrorCode.INTERNAL)
    status = grpc.StatusCode.UNKNOWN.name
    for s in grpc.StatusCode:
        if s.value[0] == err.grpc_status:
            status = s.name
    return DpoClientError(
        code,
        err.message,
        status,
        retry_after_s=err.retry_after_seconds if err.HasField("retry_after_seconds") else None,
        errors=[(v.field, v.description) for v in err.field_violations],
    )


class GrpcTransport:
    """gRPC over a sync channel (plaintext, or TLS with ``credentials``)."""

    def __init__(
        self,
        target: str,
        api_key: str | None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = [
            ("grpc.max_send_message_length", -1),  # the server enforces its own limit
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            *options,
        ]
        self._channel = (
            grpc.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.DpoServiceStub(self._channel)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None

    @staticmethod
    def to_proto(body: Mapping[str, Any]) -> pb.ComputeLossRequest:
        try:
            return request_from_dict(body)
        except (ValueError, TypeError) as exc:
            raise DpoClientError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    def compute_loss(self, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        msg = self._call(self._stub.ComputeLoss, self.to_proto(body), timeout)
        return response_from_proto(msg)

    def stream(
        self, bodies: Iterable[dict[str, Any]], timeout: float | None
    ) -> Iterator[dict[str, Any] | DpoClientError]:
        requests = (pb.StreamComputeLossRequest(request=self.to_proto(b)) for b in bodies)
        try:
            for answer in self._stub.StreamComputeLoss(
                requests, timeout=timeout, metadata=self.metadata
            ):
                if answer.WhichOneof("outcome") == "error":
                    yield stream_error(answer.error)
                else:
                    yield response_from_proto(answer.response)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None

    def model_info(self, timeout: float | None) -> dict[str, Any]:
        msg = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return model_info_from_proto(msg)

    def checkpoint(self, timeout: float | None) -> dict[str, Any]:
        msg = self._call(self._stub.Checkpoint, pb.CheckpointRequest(), timeout)
        return {
            "model_version": msg.model_version,
            "path": msg.path or None,
            "weights_sha256": msg.weights_sha256 or None,
        }

    def close(self) -> None:
        self._channel.close()
