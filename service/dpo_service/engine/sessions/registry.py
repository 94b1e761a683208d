"""The sessions of one engine: LoRA adapters on one shared frozen base (issue 12).

**The base** is the frozen initial weights: the service's frozen reference copy when
``DPO_KEEP_REFERENCE`` keeps one (no extra memory), else one frozen copy loaded at the first
session (one more copy of the weights, in the compute dtype). The default model, which keyed
trainers without a session step in full, is never the base, so its steps move no session and
no session's step moves it. Every session's adapter is a named PEFT adapter in that one base
(:mod:`dpo_service.engine.sessions.lora`); a session's ``base`` reference is the base with
every adapter disabled.

Every method that touches a model runs on the engine's worker thread (the engine calls them
from its executor); the registry itself never starts threads.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dpo_service.engine.precision import compute_dtype_of
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.results import LossResult
from dpo_service.engine.sessions import lora
from dpo_service.engine.sessions.persist import restore, snapshot
from dpo_service.engine.sessions.session import (
    REFERENCES,
    Session,
    SessionConfig,
    StepOutcome,
    key_digest,
)
from dpo_service.engine.sessions.training import session_losses, session_step, session_train
from dpo_service.engine.train_state import TrainState
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings, StepRollback
from dpo_service.state.sessions_store import SessionStore

log = logging.getLogger(__name__)


class SessionTrainState(TrainState):
    """A session's :class:`TrainState`: the trainable tensors are its adapter's, whatever
    ``requires_grad`` PEFT left on them while another adapter was active."""

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.bundle.model.parameters())


def freeze(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in eval mode with every weight frozen and its linear layers in ``dtype``."""
    from dpo_service.engine.precision import store_frozen_in

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    store_frozen_in(model, dtype)
    return model


class SessionRegistry:
    """Create, find, authorize, run and delete sessions (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        bundle: ModelBundle,
        reference: Any,
        base_factory: Callable[[], nn.Module],
        on_new_base: Callable[[nn.Module], None] | None = None,
    ) -> None:
        self.settings = settings
        # called with a base loaded for the sessions (not the frozen reference copy): the
        # engine binds it to the reference log-prob cache as an ``adapter-off`` reference
        self._on_new_base = on_new_base
        self.bundle = bundle
        self._reference: nn.Module | None = reference  # the frozen reference copy, if any
        self._base_factory = base_factory
        self.base: nn.Module | None = None
        self.sessions: dict[str, Session] = {}
        root = settings.checkpoint_dir
        self.store = None if root is None else SessionStore(root / "sessions")
        # under torchrun (issue 13), rank 0's engine sends every change to the other ranks
        self.on_sync: Callable[[Session], None] | None = None  # created or resumed
        self.on_delete: Callable[[str], None] | None = None

    # ----------------------------------------------------------------- durability
    def resume(self) -> int:
        """Recreate every session checkpointed under the checkpoint directory (at load)."""
        if self.store is None:
            return 0
        count = 0
        for stored in self.store.load_all():
            try:
                session = restore(self.create, stored)
                count += 1
                if self.on_sync is not None:
                    self.on_sync(session)
            except Exception as exc:  # a record this version cannot use: keep the rest
                log.error("session %s not resumed: %s", stored.record.get("id"), exc)
        if count:
            log.info("resumed %d session(s)", count)
        return count

    def snapshot(self, sid: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Worker thread: a copy of the session's record and tensors (written elsewhere)."""
        return snapshot(self.get(sid))

    def save(self, session: Session) -> None:
        """Worker thread: write the session's checkpoint now (no-op without a directory)."""
        if self.store is None:
            return
        record, tensors = snapshot(session)
        self.store.save(session.id, record, tensors)
        session.last_checkpoint_version = session.version

    def _after_step(self, session: Session, before: int) -> None:
        """Checkpoint every ``DPO_CHECKPOINT_EVERY`` session steps, before the answer."""
        every = self.settings.checkpoint_every
        if session.version != before and every > 0 and session.version % every == 0:
            try:
                self.save(session)
            except Exception as exc:
                log.exception("checkpoint of session %s failed", session.id)
                raise ServiceError(
                    ErrorCode.INTERNAL,
                    f"session {session.id} stepped to version {session.version} but its "
                    f"checkpoint failed ({type(exc).__name__}: {exc}); retry the checkpoint",
                ) from None

    # ----------------------------------------------------------------- the base
    def require_base(self) -> nn.Module:
        if self.base is None:
            if self._reference is not None:
                self.base = self._reference  # the frozen initial weights, shared
            else:
                compute = compute_dtype_of(self.settings.dtype)
                self.base = freeze(self._base_factory(), compute)
                log.info("sessions: loaded a frozen copy of the initial weights as their base")
                if self._on_new_base is not None:
                    self._on_new_base(self.base)  # before any adapter: its digest is the base's
        return self.base

    @property
    def base_is_reference(self) -> bool:
        return self.base is not None and self.base is self._reference

    # ----------------------------------------------------------------- lifecycle
    def create(
        self,
        config: SessionConfig,
        *,
        session_id: str | None = None,
        key_sha256: str | None = None,
        force: bool = False,
    ) -> tuple[Session, str | None]:
        """A new session; returns it and its key (None when restoring with ``key_sha256``;
        ``force``: a restore, not held to the limit). OVERLOADED at ``DPO_MAX_SESSIONS``;
        INVALID_ARGUMENT for a bad config. Written to the checkpoint directory at once, so a
        created session (and its key) survives a restart."""
        limit = self.settings.max_sessions
        if len(self.sessions) >= limit and not force:
            raise ServiceError(
                ErrorCode.OVERLOADED,
                f"the session limit is reached ({limit} sessions, DPO_MAX_SESSIONS): delete "
                "a session first",
            )
        check_config(config)
        base = self.require_base()
        sid = session_id or "s-" + uuid.uuid4().hex[:16]
        try:
            params = lora.inject(base, sid, config.lora)
        except ValueError as exc:
            raise ServiceError(ErrorCode.INVALID_ARGUMENT, f"lora: {exc}") from None
        key = None
        if key_sha256 is None:
            key = "sk-" + secrets.token_urlsafe(32)
            key_sha256 = key_digest(key)
        session = Session(
            id=sid,
            config=config,
            key_sha256=key_sha256,
            state=self._train_state(base, sid, params, config),
            params=params,
        )
        self.sessions[sid] = session
        if key is not None:
            self.save(session)
            if self.on_sync is not None:
                self.on_sync(session)
        return session, key

    def _train_state(
        self, base: nn.Module, sid: str, params: dict[str, nn.Parameter], config: SessionConfig
    ) -> SessionTrainState:
        view = lora.AdapterView(base, sid, params)
        opt = config.optimizer
        optimizer = torch.optim.AdamW(
            list(params.values()),
            lr=opt.lr,
            betas=(opt.beta1, opt.beta2),
            weight_decay=opt.weight_decay,
        )
        return SessionTrainState(
            bundle=dataclasses.replace(self.bundle, model=view),
            optimizer=optimizer,
            reference=base,  # type: ignore[arg-type]  # "frozen" = the base, whatever the default
            compute_dtype=compute_dtype_of(self.settings.dtype),
            rollback=StepRollback(self.settings.step_rollback),
            param_names={id(p): name for name, p in params.items()},
        )

    def delete(self, sid: str) -> None:
        self.get(sid)
        session = self.sessions.pop(sid)
        assert self.base is not None
        lora.remove(self.base, sid)
        session.params.clear()
        if self.on_delete is not None:
            self.on_delete(sid)
        if self.store is not None:
            self.store.delete(sid)

    def get(self, sid: str) -> Session:
        session = self.sessions.get(sid)
        if session is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no session {sid!r}")
        return session

    def authorize(self, sid: str, presented: str | None, admin: bool = False) -> Session:
        """The session, when ``presented`` is its key (or ``admin``: the caller showed the
        admin key); 404 for an unknown id, 401 for another key."""
        session = self.get(sid)
        if not admin and not session.key_matches(presented):
            raise ServiceError(
                ErrorCode.UNAUTHENTICATED, f"missing or invalid key for session {sid!r}"
            )
        return session

    def describe_all(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.sessions.values()]

    def settings_of(self, session: Session) -> Settings:
        return self.settings.model_copy(
            update={"max_grad_norm": session.config.optimizer.grad_clip}
        )

    # ----------------------------------------------------------------- worker thread
    def run(self, requests: list[PreparedRequest]) -> list[LossResult | BaseException]:
        """Session requests of one batch (any sessions, loss-only or one train request):
        grouped by session, one inference pass per session."""
        if len(requests) == 1 and requests[0].train:
            return [self._train(requests[0])]
        results: dict[int, LossResult | BaseException] = {}
        groups: dict[str, list[PreparedRequest]] = {}
        for r in requests:
            assert r.session is not None
            groups.setdefault(r.session, []).append(r)
        for sid, group in groups.items():
            try:
                session = self.get(sid)
                outs = session_losses(session, group, self.settings_of(session))
                session.touch()
            except ServiceError as exc:
                outs = [exc] * len(group)
            for r, out in zip(group, outs, strict=True):
                results[id(r)] = tagged(out, sid)
        return [results[id(r)] for r in requests]

    def _train(self, request: PreparedRequest) -> LossResult | BaseException:
        assert request.session is not None
        try:
            session = self.get(request.session)
            before = session.version
            result = session_train(session, request, self.settings_of(session))
            self._after_step(session, before)
            return tagged(result, session.id)
        except ServiceError as exc:
            return exc

    def export(self, sid: str) -> lora.PeftExport:
        """Worker thread: session ``sid``'s adapter in PEFT's format (tensors copied)."""
        session = self.get(sid)
        hf = self.bundle.kind == "hf"
        return lora.peft_export(
            self.require_base(),
            sid,
            session.config.lora,
            prefix="model." if hf else "",
            base_model_name=self.settings.model.removeprefix("hf:") if hf else self.bundle.name,
        )

    def step(self, sid: str, request_id: str | None) -> StepOutcome:
        session = self.get(sid)
        before = session.version
        outcome = session_step(session, request_id)
        self._after_step(session, before)
        return outcome


def tagged(result: LossResult | BaseException, sid: str) -> LossResult | BaseException:
    """``result`` marked with its session (``LossResponse.session``)."""
    if isinstance(result, BaseException):
        return result
    return dataclasses.replace(result, extra={**result.extra, "session": sid})


def check_config(config: SessionConfig) -> None:
    """INVALID_ARGUMENT for a configuration no session can run with."""
    spec, opt = config.lora, config.optimizer
    problems = []
    if not 1 <= spec.rank <= 1024:
        problems.append(f"lora.rank must be in 1..1024, got {spec.rank}")
    if not spec.alpha > 0:
        problems.append(f"lora.alpha must be > 0, got {spec.alpha}")
    if not 0 <= spec.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {spec.dropout}")
    if not spec.target_modules:
        problems.append("lora.target_modules must name at least one module")
    if not opt.lr > 0 or not opt.grad_clip > 0 or opt.weight_decay < 0:
        problems.append("optimizer: lr and grad_clip must be > 0, weight_decay >= 0")
    if not (0 <= opt.beta1 < 1 and 0 <= opt.beta2 < 1):
        problems.append("optimizer: betas must be in [0, 1)")
    if config.reference not in REFERENCES:
        problems.append(f"reference must be one of {REFERENCES}, got {config.reference!r}")
    if config.beta is not None and not config.beta > 0:
        problems.append(f"beta must be > 0, got {config.beta}")
    if problems:
        raise ServiceError(ErrorCode.INVALID_ARGUMENT, "; ".join(problems))
