"""Admission control: what every request goes through before the engine's queue.

authorize (bearer key) → check the engine accepts work → parse (off the event loop, when an
adapter passes its wire parser) → prepare (tokenize + validate against the model's limits, off
the event loop) → the engine's queue. :class:`Admission` is protocol-neutral: the HTTP
and gRPC adapters validate their wire format into a :class:`LossRequest` (the one input type
the engine reads; it never builds or persists a wire object), call it, and turn the
:class:`LossResult` or :class:`ServiceError` into their protocol's answer, so both give
identical numbers and the same error class for the same input.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from dpo_service.engine.distributed.world import current
from dpo_service.engine.engine import Engine
from dpo_service.engine.preparation import off_loop, prepare
from dpo_service.engine.results import LossResult
from dpo_service.engine.sessions.service import SessionService, prepare_session_request
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.models.bundle import ModelBundle
from dpo_service.models.loader import builtin_config, load_bundle, resolve_device, resolve_dtype
from dpo_service.schemas import LossRequest
from dpo_service.settings import Settings

log = logging.getLogger(__name__)


class Admission:
    """Admission control in front of the one :class:`Engine`, shared by both adapters."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._key = settings.api_key_value()
        self.sessions = SessionService(self)  # issue 12: /v1/sessions, SessionService

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the model (off the event loop) and start the engine's batcher."""
        if self._key is None and self.settings.allow_unauthenticated_training:
            log.warning(
                "!!! DPO_ALLOW_UNAUTHENTICATED_TRAINING=true and no DPO_API_KEY: ANYONE who can "
                "reach this server can change the model's weights !!!"
            )
        await self.engine.start()

    async def on_shutdown(self) -> bool:
        """Called after draining, before the listeners close: no new work starts (what the
        drain timeout left queued gets UNAVAILABLE), then the final checkpoint (verified on
        disk, written again if it does not verify). False when it failed: the server then
        exits non-zero, since steps it acknowledged are not durable."""
        self.engine.halt()
        if self.settings.checkpoint_dir is None or self.engine.bundle is None:
            return True
        world = current()
        if world is not None and world.broken is not None:  # issue 13
            log.error(
                "a rank failed: no final checkpoint (a step may have stopped half-way); model "
                "version %d resumes from the last periodic checkpoint",
                self.engine.version,
            )
            return False
        sessions_ok = await self.sessions.checkpoint_all()  # issue 12
        try:
            info = await self.engine.checkpoint()
        except Exception as exc:
            ckpt = self.engine.checkpointer
            last = ckpt.last.version if ckpt is not None and ckpt.last is not None else None
            log.error(
                "the final checkpoint failed (%s): model version %d is NOT durable; the last "
                "durable checkpoint is %s",
                exc,
                self.engine.version,
                "none" if last is None else f"version {last}",
            )
            return False
        log.info("final checkpoint: model version %d at %s", info.version, info.path)
        return sessions_ok

    # ------------------------------------------------------------------ admin
    async def checkpoint(self) -> dict[str, Any]:
        """Write a checkpoint now (after any running step); adapters authorize first.

        Returns ``version``, ``path``, ``files`` (name → sha256) and ``weights_sha256``.
        Raises NOT_FOUND when checkpoints are off, UNAVAILABLE while loading.
        """
        info = await self.engine.checkpoint()
        return info.as_dict()

    async def list_checkpoints(self) -> dict[str, Any]:
        """Checkpoints on disk with their verification result, and the live weights' digest."""
        return await self.engine.checkpoints()

    # ------------------------------------------------------------------ auth
    def authorize(self, presented: str | None, *, privileged: bool) -> None:
        """Check a bearer key (constant-time). ``privileged`` marks training/admin calls."""
        needs_key = privileged or self.settings.require_key_for_loss
        if self._key is None:
            if privileged and not self.settings.allow_unauthenticated_training:
                raise ServiceError(
                    ErrorCode.UNAUTHENTICATED,
                    "training and admin calls need DPO_API_KEY to be configured on the server "
                    "(or DPO_ALLOW_UNAUTHENTICATED_TRAINING=true)",
                )
            return
        if not needs_key:
            return
        if presented is None or not hmac.compare_digest(
            presented.encode("utf-8"), self._key.encode("utf-8")
        ):
            raise ServiceError(ErrorCode.UNAUTHENTICATED, "missing or invalid API key")

    def authorize_loss_call(self, presented: str | None) -> None:
        """The check before a loss call's body is read (DPO_REQUIRE_KEY_FOR_LOSS): the admin
        key, or some session's key (that request is then held to its own session when it is
        prepared; a request without a session is checked against the admin key again)."""
        if not self.sessions.holds_key(presented):
            self.authorize(presented, privileged=False)

    def _authorize_loss(self, request: LossRequest, api_key: str | None) -> None:
        """The default model's keys; a session's request is authorised by its session key
        when it is prepared (:func:`prepare_session_request`)."""
        if request.session is None:
            self.authorize(api_key, privileged=request.train)

    # ------------------------------------------------------------------ loss
    async def compute(
        self,
        request: LossRequest | Callable[[], LossRequest],
        *,
        api_key: str | None,
        timeout_s: float | None = None,
    ) -> LossResult:
        """Run one loss request end to end; raises :class:`ServiceError`.

        ``request`` is a validated :class:`LossRequest`, or a function that parses and
        validates one (adapters pass their wire bytes' parser: it runs off the event loop once
        the request is accepted). Order: the key (of a parsed request), accepted or not
        (UNAVAILABLE while loading or draining), parsed, the key of a train request,
        tokenization and the per-request checks (off the event loop, :func:`off_loop`), queued.
        An accepted request holds its place while it is parsed and prepared (a drain that
        begins meanwhile waits for it, ``Batcher.admitting``); that time counts against its
        deadline."""
        started = time.monotonic()
        if isinstance(request, LossRequest):
            self._authorize_loss(request, api_key)
        self.engine.check_accepting()
        batcher = self.engine._batcher  # the engine's queue: set once it accepts work
        assert batcher is not None
        timeout = self.settings.request_timeout_s
        if timeout_s is not None:
            timeout = min(timeout, timeout_s)
        tokenizer, limits = self.engine.require_bundle().tokenizer, self.engine.limits()
        with batcher.admitting():
            if not isinstance(request, LossRequest):
                request = await off_loop(request)
                self._authorize_loss(request, api_key)
            if request.session is not None or request.accumulate:  # issue 12: sessions
                prepared = await off_loop(
                    prepare_session_request, self.engine.sessions, request, api_key,
                    tokenizer, limits,
                )  # fmt: skip
            else:
                prepared = await off_loop(prepare, request, tokenizer, limits)
            if request.train:  # valid, but refused while a failed checkpoint pauses training
                await self.engine.check_training()
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise ServiceError(
                ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while the request was prepared"
            )
        return await batcher.submit(prepared, remaining)


def bundle_factory(settings: Settings) -> Callable[[], ModelBundle]:
    """What loads the model ``settings`` name (under torchrun: on this rank's device)."""

    def factory() -> ModelBundle:
        world = current()
        return load_bundle(
            settings.model,
            device=world.device if world is not None else resolve_device(settings.device),
            dtype=resolve_dtype(settings.dtype),
            builtin=builtin_config(
                d_model=settings.builtin_d_model,
                layers=settings.builtin_layers,
                heads=settings.builtin_heads,
                kv_heads=settings.builtin_kv_heads,
                max_seq_len=settings.builtin_max_seq_len,
                seed=settings.seed,
            ),
        )

    return factory


def make_engine(settings: Settings) -> Engine:
    """An engine that loads the model ``settings`` name (lazily, on ``start``)."""
    return Engine(settings, bundle_factory(settings))


def make_admission(settings: Settings) -> Admission:
    """Admission control for ``settings`` (the model loads when its engine starts)."""
    return Admission(settings, make_engine(settings))
