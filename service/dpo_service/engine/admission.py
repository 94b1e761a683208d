"""Admission control: what every request goes through before the engine's queue.

authorize (bearer key) → check the engine accepts work → prepare (tokenize + validate against
the model's limits) → :meth:`Engine.submit`. :class:`Admission` is protocol-neutral: the HTTP
and gRPC adapters validate their wire format into a :class:`LossRequest` (the one input type
the engine reads; it never builds or persists a wire object), call it, and turn the
:class:`LossResult` or :class:`ServiceError` into their protocol's answer, so both give
identical numbers and the same error class for the same input.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from dpo_service.engine.engine import Engine
from dpo_service.engine.preparation import prepare
from dpo_service.engine.results import LossResult
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

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the model (off the event loop) and start the engine's batcher."""
        if self._key is None and self.settings.allow_unauthenticated_training:
            log.warning(
                "!!! DPO_ALLOW_UNAUTHENTICATED_TRAINING=true and no DPO_API_KEY: ANYONE who can "
                "reach this server can change the model's weights !!!"
            )
        await self.engine.start()

    async def on_shutdown(self) -> None:
        """Called after draining, before the listeners close: no new work starts (what the
        drain timeout left queued gets UNAVAILABLE), then the final checkpoint."""
        self.engine.halt()
        if self.settings.checkpoint_dir is None or self.engine.bundle is None:
            return
        try:
            info = await self.engine.checkpoint()
        except Exception:
            log.exception("the final checkpoint failed")
            return
        log.info("final checkpoint: model version %d at %s", info.version, info.path)

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

    # ------------------------------------------------------------------ loss
    async def compute(
        self,
        request: LossRequest,
        *,
        api_key: str | None,
        timeout_s: float | None = None,
    ) -> LossResult:
        """Run one loss request end to end; raises :class:`ServiceError`."""
        self.authorize(api_key, privileged=request.train)
        self.engine.check_accepting()
        prepared = prepare(request, self.engine.require_bundle().tokenizer, self.engine.limits())
        timeout = self.settings.request_timeout_s
        if timeout_s is not None:
            timeout = min(timeout, timeout_s)
        return await self.engine.submit(prepared, timeout_s=timeout)


def make_engine(settings: Settings) -> Engine:
    """An engine that loads the model ``settings`` name (lazily, on ``start``)."""

    def factory() -> ModelBundle:
        return load_bundle(
            settings.model,
            device=resolve_device(settings.device),
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

    return Engine(settings, factory)


def make_admission(settings: Settings) -> Admission:
    """Admission control for ``settings`` (the model loads when its engine starts)."""
    return Admission(settings, make_engine(settings))
