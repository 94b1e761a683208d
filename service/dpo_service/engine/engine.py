"""The engine: the one place that touches the model.

It owns the model, tokenizer, AdamW optimizer, the optional frozen reference copy and the
model version (the number of optimizer steps applied). Requests reach it through
:meth:`Engine.submit` and the :class:`~dpo_service.engine.batcher.Batcher` (bounded queue, arrival
order); all model work runs on one worker thread, so concurrent requests never race.

- Loss-only requests are coalesced into one forward pass, up to ``max_batch_tokens`` and
  ``max_wait_ms``; each caller gets exactly its own rows back. They run under
  ``torch.inference_mode()``.
- A train request runs alone, in arrival order, and applies exactly one optimizer step. Its
  loss is computed before the step; a non-finite loss or gradient applies nothing.
- Expired or cancelled requests are dropped before they reach the model.
- With ``DPO_CHECKPOINT_DIR`` it resumes the newest valid checkpoint on load, checkpoints
  every ``DPO_CHECKPOINT_EVERY`` steps on the worker thread before the step's response is
  released (an acknowledged step at a multiple of N is durable), and on demand. When that
  checkpoint fails, training pauses until one succeeds (:mod:`dpo_service.engine.durability`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from dpo_service.engine.batcher import Batcher, Job
from dpo_service.engine.checkpointing import Checkpointer
from dpo_service.engine.distributed.parallel import parallelize, shutdown_followers
from dpo_service.engine.distributed.sessions import announce_base, announce_delete, announce_sync
from dpo_service.engine.distributed.world import current
from dpo_service.engine.durability import Durability
from dpo_service.engine.events import EngineEvents
from dpo_service.engine.loss_batch import batch_losses
from dpo_service.engine.preparation import Limits, PreparedRequest
from dpo_service.engine.reference_lookup import ReferenceLookup, open_reference_lookup
from dpo_service.engine.results import EngineInfo, LossResult
from dpo_service.engine.sessions.dispatch import run_with_sessions
from dpo_service.engine.sessions.registry import SessionRegistry
from dpo_service.engine.train_state import TrainState
from dpo_service.engine.train_step import NonFiniteStepError, run_train_step
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings
from dpo_service.state.format import CheckpointInfo

log = logging.getLogger(__name__)
_SHUTTING_DOWN = ServiceError(ErrorCode.UNAVAILABLE, "the service is shutting down")


class Engine:
    """Holds the model and serialises all work on it."""

    def __init__(
        self,
        settings: Settings,
        bundle_factory: Callable[[], ModelBundle],
        events: EngineEvents | None = None,
    ) -> None:
        self.settings = settings
        self._bundle_factory = bundle_factory
        self.events = events or EngineEvents()
        self.bundle: ModelBundle | None = None
        self.state: TrainState | None = None
        self.ready = False
        self.draining = False
        self._batcher: Batcher | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpo-engine")
        self.checkpointer: Checkpointer | None = None
        self.durability = Durability(self.events, settings.checkpoint_retry_s)
        self.reference_lookup: ReferenceLookup | None = None  # the reference log-prob cache
        self._session_base_lookup: ReferenceLookup | None = None  # sessions' own base, if any
        self.sessions: SessionRegistry | None = None  # issue 12: LoRA sessions

    # ----------------------------------------------------------------- lifecycle
    def load(self) -> None:
        """Build the model, optimizer and reference (slow: call off the event loop)."""
        bundle = self._bundle_factory()
        state = TrainState.create(bundle, self.settings)  # the frozen reference: initial weights
        if self.settings.checkpoint_dir is not None:  # resume the newest valid checkpoint
            self.checkpointer = Checkpointer.open(self.settings, state, self.events)
        world = current()
        if world is not None:  # under torchrun: every rank takes this state (issue 13)
            parallelize(world, state, self.settings)
        self.reference_lookup = open_reference_lookup(
            self.settings, state.reference, bundle, self.events
        )
        self.bundle = bundle
        self.state = state
        self.sessions = SessionRegistry(
            self.settings,
            bundle,
            state.reference,
            lambda: self._bundle_factory().model,
            on_new_base=self._cache_session_base,
        )
        if world is not None:
            self.sessions.on_sync = functools.partial(announce_sync, world)
            self.sessions.on_delete = functools.partial(announce_delete, world)
        self.sessions.resume()  # the sessions checkpointed under DPO_CHECKPOINT_DIR
        self.events.on_loaded(state.version)

    async def start(self) -> None:
        """Load on the worker thread, then start the batcher."""
        loop = asyncio.get_running_loop()
        if self.bundle is None:
            await loop.run_in_executor(self._executor, self.load)
        self._batcher = Batcher(self.settings, self.events, self._on_worker)
        if self.checkpointer is not None:
            self.durability.start(self._attempt_checkpoint)
        self.ready = True
        log.info(
            "engine ready: %s (version %d)", self.bundle.name if self.bundle else "?", self.version
        )

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, let queued and in-flight work finish. True when all finished."""
        self.draining = True
        self.ready = False
        deadline = time.monotonic() + timeout_s
        while self.pending() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.pending() == 0

    def halt(self) -> None:
        """After a drain: start no more work (queued requests get UNAVAILABLE); the running
        batch finishes, so a checkpoint submitted now holds the final state."""
        self.draining = True
        self.ready = False
        if self._batcher is not None:
            self._batcher.halt(_SHUTTING_DOWN)

    async def stop(self) -> None:
        """Stop the batcher and the worker (after :meth:`drain`)."""
        self.ready = False
        self.draining = True
        await self.durability.stop()
        if self._batcher is not None:
            await self._batcher.stop(_SHUTTING_DOWN)
        with contextlib.suppress(Exception):  # the other ranks leave (issue 13)
            await asyncio.get_running_loop().run_in_executor(self._executor, shutdown_followers)
        self._executor.shutdown(wait=True)
        if self.checkpointer is not None:
            self.checkpointer.close()
        for lookup in (self.reference_lookup, self._session_base_lookup):
            if lookup is not None:
                lookup.close()

    def pending(self) -> int:
        """Requests queued or running."""
        return self._batcher.pending() if self._batcher is not None else 0

    # ----------------------------------------------------------------- info
    @property
    def version(self) -> int:
        return self.state.version if self.state is not None else 0

    def limits(self) -> Limits:
        bundle = self.require_bundle()
        max_seq = min(self.settings.max_sequence_tokens or bundle.max_seq_len, bundle.max_seq_len)
        return Limits(
            vocab_size=bundle.vocab_size,
            max_sequence_tokens=max_seq,
            max_pairs=self.settings.max_pairs_per_request,
            max_request_tokens=self.settings.max_request_tokens,
            has_reference=self.state is not None and self.state.reference is not None,
            max_response_bytes=self.settings.grpc_max_message_bytes,  # token log-probs
        )

    def info(self) -> EngineInfo:
        """What the engine holds (``GET /v1/model``, ``GetModelInfo``), with the precision
        policy and the bytes it holds (:meth:`TrainState.precision`)."""
        bundle, state = self.require_bundle(), self.state
        if state is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the model is not loaded yet")
        param = next(bundle.model.parameters())
        precision = state.precision()
        return EngineInfo(
            name=bundle.name,
            kind=bundle.kind,
            parameters=sum(p.numel() for p in bundle.model.parameters()),
            vocab_size=bundle.vocab_size,
            max_seq_len=bundle.max_seq_len,
            dtype=precision["compute_dtype"],
            device=str(param.device),
            model_version=self.version,
            tokenizer=bundle.tokenizer.name,
            reference=state.reference is not None,
            **precision,
        )

    def _cache_session_base(self, base: torch.nn.Module) -> None:
        """Bind the sessions' own frozen base (loaded when no frozen reference copy is kept)
        to the reference log-prob cache: its adapter-off log-probs are a reference too."""
        world = current()
        if world is not None:
            announce_base(world, base)  # every rank builds it, with rank 0's weights
        self._session_base_lookup = open_reference_lookup(
            self.settings,
            base,  # type: ignore[arg-type]  # the built-in or HF causal LM, frozen
            self.require_bundle(),
            self.events,
            kind="adapter-off",
        )

    def require_bundle(self) -> ModelBundle:
        if self.bundle is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the model is not loaded yet")
        return self.bundle

    # ----------------------------------------------------------------- checkpoints
    def _require_checkpointer(self) -> Checkpointer:
        self.require_bundle()
        if self.checkpointer is None:
            raise ServiceError(
                ErrorCode.NOT_FOUND,
                "checkpoints are off on this server (DPO_CHECKPOINT_DIR is not set)",
            )
        return self.checkpointer

    async def checkpoint(self) -> CheckpointInfo:
        """Write a checkpoint now, on the worker thread (after any running step); when this
        version is on disk already, verify it and write it again if it does not verify."""
        self._require_checkpointer()
        try:
            pending = asyncio.get_running_loop().run_in_executor(
                self._executor, self._checkpoint_now
            )
        except RuntimeError as exc:  # executor shut down
            raise ServiceError(ErrorCode.UNAVAILABLE, f"the engine is stopped: {exc}") from None
        try:
            return await pending
        except Exception as exc:
            log.exception("checkpoint failed")
            raise ServiceError(
                ErrorCode.INTERNAL, f"checkpoint failed: {type(exc).__name__}: {exc}"
            ) from None

    async def _attempt_checkpoint(self) -> None:
        """A retry of the failed checkpoint (raises when it fails again)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._checkpoint_now)

    async def check_training(self) -> None:
        """Admission of a train request: UNAVAILABLE while degraded (after one retry)."""
        await self.durability.check(self._attempt_checkpoint, retry=not self.draining)

    async def checkpoints(self) -> dict[str, Any]:
        """The checkpoints on disk (verified) and the live weights' digest."""
        ckpt, state = self._require_checkpointer(), self.state
        assert state is not None
        listing = await asyncio.to_thread(ckpt.store.describe)
        live = await asyncio.get_running_loop().run_in_executor(self._executor, ckpt.live, state)
        return {**listing, "live": live}

    def _checkpoint_now(self) -> CheckpointInfo:
        """Worker thread: checkpoint the current state (no write when this version is on
        disk and verifies); a success ends the degraded state."""
        assert self.state is not None and self.checkpointer is not None
        info = self.checkpointer.save(self.state)
        self.durability.recovered(info.version)
        return info

    # ----------------------------------------------------------------- submission
    def check_accepting(self) -> None:
        """Raise UNAVAILABLE while loading or draining, or when a rank failed."""
        world = current()
        if world is not None:
            world.check()
        if self.draining:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the service is draining", retry_after_s=1.0)
        if not self.ready or self._batcher is None:
            raise ServiceError(
                ErrorCode.UNAVAILABLE, "the model is still loading", retry_after_s=1.0
            )

    async def submit(
        self, request: PreparedRequest, *, timeout_s: float | None = None
    ) -> LossResult:
        """Queue ``request``; wait for its result. Raises :class:`ServiceError`."""
        self.check_accepting()
        assert self._batcher is not None
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        return await self._batcher.submit(request, timeout)

    async def on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread, after any running batch (sessions' admin
        work: create, delete, step, export; issue 12)."""
        try:
            pending = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # executor shut down
            raise ServiceError(ErrorCode.UNAVAILABLE, f"the engine is stopped: {exc}") from None
        return await pending

    async def _on_worker(self, batch: list[Job]) -> list[LossResult | BaseException]:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._run_batch, batch
        )

    # ----------------------------------------------------------------- worker thread
    def _run_batch(self, batch: list[Job]) -> list[LossResult | BaseException]:
        """Runs on the worker thread: the only place model work happens."""
        assert self.state is not None
        live = [j for j in batch if j.claim()]
        results: dict[int, LossResult | BaseException] = {}
        for j in batch:
            if j.state == "abandoned":
                self.events.on_dropped(j.drop_reason)  # "cancelled" when the caller left
                results[id(j)] = ServiceError(
                    ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before the model was free"
                )
        if live:
            for j, r in zip(live, self._run_claimed(live), strict=True):
                results[id(j)] = r
        return [results[id(j)] for j in batch]

    def _run_claimed(self, batch: list[Job]) -> list[LossResult | BaseException]:
        assert self.state is not None
        self.events.on_batch(len(batch), sum(j.request.num_pairs for j in batch))
        if self.sessions is not None and any(j.request.session is not None for j in batch):
            return run_with_sessions(self.sessions, batch, self._run_default)
        return self._run_default(batch)

    def _run_default(self, batch: list[Job]) -> list[LossResult | BaseException]:
        """Requests on the default (full-parameter) model."""
        if len(batch) == 1 and batch[0].request.train:
            return [self._train_one(batch[0].request)]
        try:
            state = self.state
            assert state is not None
            return batch_losses(
                state.bundle.causal_lm,
                state.reference,
                [j.request for j in batch],
                self.settings,
                state.bundle,
                self.version,
            )
        except ServiceError as exc:
            return [exc for _ in batch]
        except Exception as exc:
            log.exception("loss batch failed")
            return [
                ServiceError(ErrorCode.INTERNAL, f"model error: {type(exc).__name__}")
                for _ in batch
            ]

    def _train_one(self, request: PreparedRequest) -> LossResult | BaseException:
        assert self.state is not None
        if self.durability.degraded:
            return self.durability.error()  # queued before the due checkpoint failed
        before = self.state.version
        try:
            response = run_train_step(self.state, request, self.settings)
        except NonFiniteStepError as exc:
            self.events.on_step_rejected()
            return exc
        except ServiceError as exc:
            return exc
        except Exception as exc:
            log.exception("train step failed (request_id=%s)", request.request_id)
            return ServiceError(ErrorCode.INTERNAL, f"train step failed: {type(exc).__name__}")
        if self.state.version == before:
            return response  # a retried request_id: nothing was applied
        self.events.on_step(self.state.version, response.loss)
        every = self.settings.checkpoint_every
        if self.checkpointer is not None and every > 0 and self.state.version % every == 0:
            try:
                self._checkpoint_now()
            except Exception as exc:
                log.exception("checkpoint at version %d failed", self.state.version)
                return self.durability.fail(self.state.version, self.checkpointer.last, exc)
        return response
