"""Python client for remote trainers: one interface over REST (httpx) and gRPC.

    from dpo_service.client import DpoClient

    with DpoClient.grpc("127.0.0.1:50051", api_key=KEY) as client:   # or DpoClient.http(URL)
        out = client.compute_loss([("Q: 2+2?", " 4", " five")], beta=0.1, train=True)
        print(out.loss, out.new_model_version)

- ``pairs`` are dicts (the REST pair shape) or tuples ``(prompt, chosen, rejected)`` of
  strings or of token-id lists, optionally followed by the two reference log-probs.
- Every call has a deadline (``deadline_s``, default the client's ``timeout``) covering all
  its attempts; the remaining time is sent to the server (gRPC deadline / HTTP timeout).
- Retries, with jittered exponential backoff and the server's ``Retry-After`` honoured, only
  for overload and unavailability (HTTP 429/503, gRPC RESOURCE_EXHAUSTED "overloaded" and
  UNAVAILABLE, connection failures); bounded by ``RetryPolicy.max_attempts``,
  ``RetryPolicy.max_total_s`` and the deadline. A train call without ``request_id`` gets a
  generated one, so a retry can never apply a step twice (the server deduplicates by id).
- Failures raise :class:`DpoClientError` with the service's :class:`ErrorCode`.

This module needs only httpx, grpcio and protobuf (no torch).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from dpo_service.client.messages import check_conversation_pair, is_message_list
from dpo_service.client.results import CheckpointResult, LossResult, ModelInfo
from dpo_service.client.transports import (
    DpoClientError,
    GrpcTransport,
    HttpTransport,
    Transport,
)
from dpo_service.errors import ErrorCode

__all__ = [
    "CheckpointResult",
    "DpoClient",
    "DpoClientError",
    "ErrorCode",
    "LossResult",
    "ModelInfo",
    "RetryPolicy",
]

T = TypeVar("T")
RETRYABLE = frozenset({ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff for overload/unavailability only."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    max_total_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        backoff = cap / 2 + self.rng.uniform(0, cap / 2)  # "equal jitter"
        return max(backoff, retry_after_s or 0.0)


# ---------------------------------------------------------------------------- the client
def _ids(value: Any) -> list[int]:
    return list(value.tolist() if hasattr(value, "tolist") else value)


_TEXT_KEYS = ("prompt", "chosen", "rejected")


def _conversation(pair: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A pair holding chat messages, checked (``pairs[i].<field>: <problem>`` otherwise)."""
    try:
        return check_conversation_pair(pair)
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise DpoClientError(
            ErrorCode.INVALID_ARGUMENT,
            f"pairs[{index}].{exc}",
            errors=[(f"pairs[{index}].{field}", problem)],
        ) from None


def normalize_pair(pair: Any, index: int) -> dict[str, Any]:
    """A dict, or a ``(prompt, chosen, rejected[, ref_chosen, ref_rejected])`` tuple, as the
    REST pair shape.

    Chat messages pass through unchanged once checked (roles, string contents; see
    :mod:`dpo_service.client.messages`): TRL's conversational form (``prompt`` a list of
    ``{"role", "content"}`` messages, ``chosen`` / ``rejected`` lists of assistant messages or
    strings) and its implicit-prompt form (a dict with ``chosen`` / ``rejected`` conversations
    sharing their first messages, no ``prompt``).
    """
    if isinstance(pair, Mapping):
        if any(is_message_list(pair.get(k)) for k in _TEXT_KEYS):
            return _conversation(pair, index)
        return dict(pair)
    if hasattr(pair, "model_dump"):
        return dict(pair.model_dump(exclude_none=True))
    if isinstance(pair, (tuple, list)) and len(pair) in (3, 5):
        triple = pair[:3]
        if any(is_message_list(x) for x in triple):
            out = _conversation(dict(zip(_TEXT_KEYS, triple, strict=True)), index)
        elif all(isinstance(x, str) for x in triple):
            out = dict(zip(_TEXT_KEYS, triple, strict=True))
        elif not any(isinstance(x, (str, bytes)) for x in triple):
            out = {
                k: _ids(x)
                for k, x in zip(("prompt_ids", "chosen_ids", "rejected_ids"), triple, strict=True)
            }
        else:
            raise DpoClientError(
                ErrorCode.INVALID_ARGUMENT, f"pairs[{index}]: mixes text and token ids"
            )
        if len(pair) == 5:
            out["reference_chosen_logp"], out["reference_rejected_logp"] = pair[3], pair[4]
        return out
    raise DpoClientError(
        ErrorCode.INVALID_ARGUMENT,
        f"pairs[{index}]: expected a dict or a (prompt, chosen, rejected) tuple",
    )


class DpoClient:
    """One interface over REST and gRPC; see the module docstring."""

    def __init__(
        self, transport: Transport, *, timeout: float = 60.0, retry: RetryPolicy | None = None
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    @classmethod
    def http(
        cls, base_url: str, api_key: str | None = None, timeout: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> DpoClient:  # fmt: skip
        """A REST client for ``base_url`` (e.g. ``http://127.0.0.1:8000``)."""
        return cls(HttpTransport(base_url, api_key, timeout), timeout=timeout, retry=retry)

    @classmethod
    def grpc(
        cls, target: str, api_key: str | None = None, timeout: float = 60.0,
        retry: RetryPolicy | None = None, credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> DpoClient:  # fmt: skip
        """A gRPC client for ``target`` (e.g. ``127.0.0.1:50051``)."""
        transport = GrpcTransport(target, api_key, credentials, options)
        return cls(transport, timeout=timeout, retry=retry)

    # ------------------------------------------------------------------ calls
    def build_request(
        self, pairs: Iterable[Any], *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
        train: bool = False, reference: str = "auto", request_id: str | None = None,
        expected_version: int | None = None, **extra: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """The REST body of a loss call (train calls always get a ``request_id``).
        ``loss_type`` may be a list of terms (with ``loss_weights=[...]`` in ``extra``)."""
        body: dict[str, Any] = {
            "pairs": [normalize_pair(p, i) for i, p in enumerate(pairs)],
            "beta": beta,
            "loss_type": loss_type if isinstance(loss_type, str) else list(loss_type),
            "reference": reference,
            "train": train,
            **extra,
        }
        if request_id is None and train:
            request_id = uuid.uuid4().hex
        if request_id is not None:
            body["request_id"] = request_id
        if expected_version is not None:
            body["expected_version"] = expected_version
        return body

    def compute_loss(
        self, pairs: Iterable[Any], *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
        train: bool = False, reference: str = "auto", request_id: str | None = None,
        expected_version: int | None = None, deadline_s: float | None = None, **extra: Any,
    ) -> LossResult:  # fmt: skip
        """DPO loss of ``pairs``; with ``train=True`` also one optimizer step on the server.
        ``extra``: further request fields (``label_smoothing``, ``simpo_gamma``,
        ``loss_weights`` with a list ``loss_type``, ``return_token_logps=True``)."""
        body = self.build_request(
            pairs, beta=beta, loss_type=loss_type, train=train, reference=reference,
            request_id=request_id, expected_version=expected_version, **extra,
        )  # fmt: skip
        return LossResult.from_dict(self._loss_with_retries(body, deadline_s))

    def stream_losses(
        self, batches: Iterable[Mapping[str, Any]], *, deadline_s: float | None = None
    ) -> Iterator[LossResult | DpoClientError]:
        """One answer per batch, in order (gRPC: one ``StreamComputeLoss`` stream; REST: one
        call each). Each batch holds ``compute_loss``'s keyword arguments (``pairs`` included);
        a failed batch yields its :class:`DpoClientError` and the stream goes on.
        ``deadline_s`` bounds the whole stream (default: none) and no batch is retried."""
        bodies = (self.build_request(**dict(b)) for b in batches)
        if isinstance(self.transport, GrpcTransport):
            for item in self.transport.stream(bodies, deadline_s):
                yield item if isinstance(item, DpoClientError) else LossResult.from_dict(item)
            return
        for body in bodies:
            try:
                data = self._loss_with_retries(body, deadline_s)
                yield LossResult.from_dict(data)
            except DpoClientError as err:
                yield err

    def model_info(self, *, deadline_s: float | None = None) -> ModelInfo:
        """The model the server holds."""
        return ModelInfo.from_dict(self._with_retries(self.transport.model_info, deadline_s))

    def checkpoint(self, *, deadline_s: float | None = None) -> CheckpointResult:
        """Admin: ask the server to write a checkpoint now (needs the API key)."""
        data = self._with_retries(self.transport.checkpoint, deadline_s)
        version = data.get("model_version", data.get("version", 0))
        return CheckpointResult(int(version), data.get("path"), data.get("weights_sha256"))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> DpoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ retries
    def _loss_with_retries(self, body: dict[str, Any], deadline_s: float | None) -> dict[str, Any]:
        return self._with_retries(lambda t: self.transport.compute_loss(body, t), deadline_s)

    def _with_retries(self, call: Callable[[float | None], T], deadline_s: float | None) -> T:
        budget = self.timeout if deadline_s is None else deadline_s
        start = time.monotonic()
        end = start + budget if budget and budget > 0 else None
        attempt = 0
        while True:
            attempt += 1
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DpoClientError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"deadline of {budget:.3g} s passed",
                    attempts=attempt,
                )
            try:
                return call(remaining)
            except DpoClientError as err:
                err.attempts = attempt
                if err.code not in RETRYABLE or attempt >= self.retry.max_attempts:
                    raise
                delay = self.retry.delay(attempt, err.retry_after_s)
                now = time.monotonic()
                if (end is not None and now + delay >= end) or (
                    now + delay - start > self.retry.max_total_s
                ):
                    raise
                time.sleep(delay)
