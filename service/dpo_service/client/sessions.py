"""Client side of training sessions (issue 12): create, describe, step, checkpoint and
delete a session over REST or gRPC (``dpo.v1.SessionService``); the remote trainer's
``--session``. Errors are :class:`DpoClientError`, as for loss calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import httpx

from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.client.transports import DpoClientError, _grpc_error
from dpo_service.errors import ErrorCode

_REFERENCE = {"base": 1, "none": 2, "client": 3}


def _http_error(r: httpx.Response) -> DpoClientError:
    try:
        body = r.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    try:
        code = ErrorCode(body.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    return DpoClientError(code, str(body.get("detail") or r.text[:500]), r.status_code)


class SessionAdmin:
    """Session calls against ``target`` (``grpc://host:port`` or ``http(s)://…``)."""

    def __init__(self, target: str, timeout: float = 120.0) -> None:
        self.grpc = target.startswith("grpc://")
        self.timeout = timeout
        if self.grpc:
            self._channel = grpc.insecure_channel(target.removeprefix("grpc://"))
            self._stub = pb_grpc.SessionServiceStub(self._channel)
        else:
            self._http = httpx.Client(base_url=target, timeout=timeout)

    def close(self) -> None:
        if self.grpc:
            self._channel.close()
        else:
            self._http.close()

    def __enter__(self) -> SessionAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rpc(self, method: Callable[..., Any], request: Any, key: str | None) -> Any:
        meta = (("authorization", f"Bearer {key}"),) if key else ()
        try:
            return method(request, timeout=self.timeout, metadata=meta)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None

    def _rest(self, method: str, path: str, key: str | None, **kw: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            r = self._http.request(method, path, headers=headers, **kw)
        except httpx.TransportError as exc:
            raise DpoClientError(ErrorCode.UNAVAILABLE, f"connection failed: {exc!r}") from exc
        if not r.is_success:
            raise _http_error(r)
        return dict(r.json()) if r.content else {}

    def create(
        self, admin_key: str | None, *, lora: dict[str, Any], optimizer: dict[str, Any],
        reference: str = "base",
    ) -> tuple[str, str]:  # fmt: skip
        """A new session (admin key); returns its id and its key (shown only now)."""
        if not self.grpc:
            body = {"lora": lora, "optimizer": optimizer, "reference": reference}
            out = self._rest("POST", "/v1/sessions", admin_key, json=body)
            return str(out["session"]["id"]), str(out["key"])
        opt = dict(optimizer)
        betas = opt.pop("betas", None)
        if betas is not None:
            opt["beta1"], opt["beta2"] = betas
        config = pb.SessionConfig(
            lora=pb.SessionLora(**lora),
            optimizer=pb.SessionOptimizer(**opt),
            reference=_REFERENCE[reference],  # type: ignore[arg-type]
        )
        msg = self._rpc(self._stub.CreateSession, pb.CreateSessionRequest(config=config), admin_key)
        return str(msg.session.id), str(msg.key)

    def get(self, sid: str, key: str | None) -> dict[str, Any]:
        """The session's version, steps, sizes and last loss."""
        if not self.grpc:
            return self._rest("GET", f"/v1/sessions/{sid}", key)
        msg = self._rpc(self._stub.GetSession, pb.GetSessionRequest(session=sid), key).session
        return {
            "id": msg.id,
            "model_version": msg.model_version,
            "trainable_parameters": msg.trainable_parameters,
            "state_bytes": msg.state_bytes,
            "last_loss": msg.last_loss if msg.HasField("last_loss") else None,
        }

    def step(self, sid: str, key: str | None, request_id: str | None = None) -> dict[str, Any]:
        """One step over the accumulated gradient."""
        if not self.grpc:
            body = {} if request_id is None else {"request_id": request_id}
            return self._rest("POST", f"/v1/sessions/{sid}/step", key, json=body)
        request = pb.StepRequest(session=sid)
        if request_id is not None:
            request.request_id = request_id
        msg = self._rpc(self._stub.Step, request, key)
        return {"new_model_version": msg.new_model_version, "pairs": msg.pairs}

    def checkpoint(self, sid: str, key: str | None) -> dict[str, Any]:
        if not self.grpc:
            return self._rest("POST", f"/v1/sessions/{sid}/checkpoint", key)
        req = pb.CheckpointSessionRequest(session=sid)
        msg = self._rpc(self._stub.CheckpointSession, req, key)
        return {"session": msg.session, "model_version": msg.model_version, "path": msg.path}
