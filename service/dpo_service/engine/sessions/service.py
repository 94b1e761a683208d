"""The sessions API, protocol-neutral (issue 12): what ``/v1/sessions`` and
``dpo.v1.SessionService`` call, and the admission of loss requests that name a session.

Keys: creating and listing sessions need the admin key (``DPO_API_KEY``); everything about
one session (its loss and train requests, get, step, checkpoint, export, delete) takes that
session's key, or the admin key. An unknown session is NOT_FOUND, a wrong key
UNAUTHENTICATED. Model work (create, delete, step, export) runs on the engine's worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from dpo_service.engine.engine import Engine
from dpo_service.engine.preparation import Limits, PreparedRequest, prepare
from dpo_service.engine.results import LossResult
from dpo_service.engine.sessions.export import adapter_tar
from dpo_service.engine.sessions.lora import LoraSpec
from dpo_service.engine.sessions.registry import SessionRegistry
from dpo_service.engine.sessions.session import (
    OptimizerSpec,
    Session,
    SessionConfig,
    StepOutcome,
)
from dpo_service.errors import ErrorCode, ServiceError, invalid
from dpo_service.models.bundle import TripleTokenizer
from dpo_service.schemas import SESSION_ID_PATTERN, LossRequest
from modern_llm.alignment.dpo_loss import LossType


class Admission(Protocol):
    """What the sessions API needs of :class:`~dpo_service.engine.admission.Admission`."""

    engine: Engine

    def authorize(self, presented: str | None, *, privileged: bool) -> None: ...


T = TypeVar("T")
log = logging.getLogger(__name__)
_REFERENCE_OF = {"base": "frozen", "none": "none"}


def prepare_session_request(
    registry: SessionRegistry | None,
    request: LossRequest,
    api_key: str | None,
    tokenizer: TripleTokenizer,
    limits: Limits,
) -> PreparedRequest:
    """Authorise a loss request on a session (its key), apply the session's defaults and
    reference choice, and prepare it for the engine (runs off the event loop)."""
    if request.accumulate and not request.train:
        raise invalid("accumulate", "accumulate=true needs train=true")
    if request.session is None:
        raise invalid("accumulate", "accumulate=true needs a session")
    if registry is None:
        raise ServiceError(ErrorCode.UNAVAILABLE, "the model is still loading", retry_after_s=1.0)
    session = registry.authorize(request.session, api_key)
    request = request.model_copy(update=_defaults(session, request))
    prepared = prepare(request, tokenizer, dataclasses.replace(limits, has_reference=True))
    digest = prepared.digest
    if digest is not None and request.accumulate:
        digest += "/accumulate"  # a request_id of a step is not one of an accumulation
    return dataclasses.replace(
        prepared, session=session.id, accumulate=request.accumulate, digest=digest
    )


def _defaults(session: Session, request: LossRequest) -> dict[str, Any]:
    """The session's beta, loss_type and reference where the request left them unset."""
    update: dict[str, Any] = {}
    config, given = session.config, request.model_fields_set
    if "beta" not in given and config.beta is not None:
        update["beta"] = config.beta
    if "loss_type" not in given and config.loss_type is not None:
        update["loss_type"] = LossType(config.loss_type)
    per_pair = any(p.reference_chosen_logp is not None for p in request.pairs)
    if request.reference == "auto" and not per_pair:
        if config.reference == "client":
            raise invalid(
                "pairs[0].reference_chosen_logp",
                f"session {session.id} takes client reference log-probs: send "
                "reference_chosen_logp and reference_rejected_logp with every pair",
            )
        update["reference"] = _REFERENCE_OF[config.reference]
    return update


def session_fields(result: LossResult) -> dict[str, Any]:
    """The response fields of a session's result (``session``, ``accumulated_pairs``)."""
    return {
        "session": result.extra.get("session"),
        "accumulated_pairs": result.extra.get("accumulated_pairs"),
    }


def config_from_wire(body: dict[str, Any]) -> SessionConfig:
    """A :class:`SessionConfig` from a validated ``SessionCreate`` dump."""
    lora_body, opt = body["lora"], body["optimizer"]
    return SessionConfig(
        lora=LoraSpec(
            rank=lora_body["rank"],
            alpha=float(lora_body["alpha"]),
            dropout=float(lora_body["dropout"]),
            target_modules=tuple(dict.fromkeys(lora_body["target_modules"])),
            seed=lora_body["seed"],
        ),
        optimizer=OptimizerSpec(
            lr=opt["lr"],
            beta1=opt["betas"][0],
            beta2=opt["betas"][1],
            weight_decay=opt["weight_decay"],
            grad_clip=opt["grad_clip"],
        ),
        beta=body.get("beta"),
        loss_type=None if body.get("loss_type") is None else str(body["loss_type"]),
        reference=body["reference"],
    )


def config_to_wire(config: SessionConfig) -> dict[str, Any]:
    """The ``SessionCreate`` shape of a session's configuration."""
    opt = config.optimizer
    return {
        "lora": config.lora.to_json(),
        "optimizer": {
            "lr": opt.lr,
            "betas": [opt.beta1, opt.beta2],
            "weight_decay": opt.weight_decay,
            "grad_clip": opt.grad_clip,
        },
        "beta": config.beta,
        "loss_type": config.loss_type,
        "reference": config.reference,
    }


def describe(session: Session) -> dict[str, Any]:
    """A session as ``SessionInfo`` fields."""
    return {**session.describe(), "config": config_to_wire(session.config)}


class SessionService:
    """Create, list, get, delete, step, checkpoint and export sessions (see the module
    docstring); ``admission`` gives the keys and the engine."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.engine = admission.engine

    @property
    def registry(self) -> SessionRegistry:
        self.engine.require_bundle()
        registry = self.engine.sessions
        if registry is None or self.engine.settings.max_sessions == 0:
            raise ServiceError(ErrorCode.NOT_FOUND, "sessions are off (DPO_MAX_SESSIONS=0)")
        return registry

    def _admin(self, api_key: str | None) -> None:
        self.admission.authorize(api_key, privileged=True)

    def _is_admin(self, api_key: str | None) -> bool:
        try:
            self._admin(api_key)
        except ServiceError:
            return False
        return api_key is not None

    def holds_key(self, api_key: str | None) -> bool:
        """Whether ``api_key`` is some session's key (constant time per session)."""
        registry = self.engine.sessions
        if api_key is None or registry is None:
            return False
        return any([s.key_matches(api_key) for s in list(registry.sessions.values())])

    def session(self, sid: str, api_key: str | None) -> Session:
        """The session ``sid`` when ``api_key`` is its key or the admin key (a malformed id
        is INVALID_ARGUMENT on both protocols, as the REST path's pattern makes it)."""
        if not re.fullmatch(SESSION_ID_PATTERN, sid):
            raise invalid("session", f"not a session id: {sid[:40]!r} (s- and 16 hex digits)")
        return self.registry.authorize(sid, api_key, admin=self._is_admin(api_key))

    async def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        self.engine.check_accepting()
        return await self.engine.on_worker(fn, *args)

    async def create(self, config: SessionConfig, api_key: str | None) -> tuple[Session, str]:
        self._admin(api_key)
        session, key = await self._on_worker(self.registry.create, config)
        assert key is not None
        return session, key

    def list(self, api_key: str | None) -> list[dict[str, Any]]:
        self._admin(api_key)
        return [describe(s) for s in self.registry.sessions.values()]

    def get(self, sid: str, api_key: str | None) -> dict[str, Any]:
        return describe(self.session(sid, api_key))

    async def delete(self, sid: str, api_key: str | None) -> None:
        self.session(sid, api_key)
        await self._on_worker(self.registry.delete, sid)

    async def checkpoint(self, sid: str, api_key: str | None) -> dict[str, Any]:
        """Write the session's checkpoint now: its tensors are copied on the worker thread,
        then written off it (another session's work never waits on this write)."""
        self.session(sid, api_key)
        store = self.registry.store
        if store is None:
            raise ServiceError(
                ErrorCode.NOT_FOUND,
                "checkpoints are off on this server (DPO_CHECKPOINT_DIR is not set)",
            )
        record, tensors = await self._on_worker(self.registry.snapshot, sid)
        path = await asyncio.to_thread(store.save, sid, record, tensors)
        return {"session": sid, "model_version": int(record["version"]), "path": str(path)}

    async def checkpoint_all(self) -> bool:
        """At shutdown (after the drain): every session's final checkpoint. False when one
        failed (logged)."""
        registry = self.engine.sessions
        if registry is None or registry.store is None:
            return True
        ok = True
        for sid in list(registry.sessions):
            try:
                await self.engine.on_worker(registry.save, registry.get(sid))
            except Exception as exc:
                log.error("final checkpoint of session %s failed: %s", sid, exc)
                ok = False
        return ok

    async def export(self, sid: str, api_key: str | None) -> bytes:
        """The session's adapter as a tar of PEFT's two files (see :mod:`.export`)."""
        self.session(sid, api_key)
        found = await self._on_worker(self.registry.export, sid)
        return await asyncio.to_thread(adapter_tar, found)

    async def step(self, sid: str, request_id: str | None, api_key: str | None) -> StepOutcome:
        self.session(sid, api_key)
        await self.engine.check_training()
        return await self._on_worker(self.registry.step, sid, request_id)
