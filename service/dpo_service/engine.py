"""The engine: the one place that touches the model.

It owns the model, tokenizer, AdamW optimizer, the optional frozen reference copy and the
model version (the number of optimizer steps applied). Requests reach it through
:meth:`Engine.submit`; a single batcher coroutine takes them from a bounded queue in arrival
order and runs model work on one worker thread, so concurrent requests never race.

- Loss-only requests are coalesced into one forward pass, up to ``max_batch_tokens`` and
  ``max_wait_ms``; each caller gets exactly its own rows back. They run under
  ``torch.inference_mode()``.
- A train request runs alone, in arrival order, and applies exactly one optimizer step. Its
  loss is computed before the step; a non-finite loss or gradient applies nothing.
- Expired or cancelled requests are dropped before they reach the model.
- With ``DPO_CHECKPOINT_DIR`` it resumes the latest valid checkpoint on load, checkpoints
  every ``DPO_CHECKPOINT_EVERY`` steps on the worker thread before the step's response is
  released (an acknowledged step at a multiple of N is durable), and on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_service.checkpoint import CheckpointInfo
from dpo_service.durability import Checkpointer
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.events import EngineEvents
from dpo_service.model_loader import ModelBundle
from dpo_service.preprocess import Limits, PreparedRequest
from dpo_service.schemas import LossResponse, ModelInfo
from dpo_service.settings import Settings
from dpo_service.training import TrainState, build_response, forward_logps, run_train_step

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: PreparedRequest
    future: asyncio.Future[LossResponse]
    deadline: float | None
    enqueued_at: float = field(default_factory=time.monotonic)
    # "queued" → "started" (claimed by the worker) or "abandoned" (caller gave up); the lock
    # makes the two transitions exclusive, so abandoned work never reaches the model.
    state: str = "queued"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def abandon(self) -> None:
        with self.lock:
            if self.state == "queued":
                self.state = "abandoned"

    def claim(self) -> bool:
        """Called on the worker thread right before model work: False if it must be dropped."""
        with self.lock:
            if self.state == "queued" and not self.expired(time.monotonic()):
                self.state = "started"
            elif self.state == "queued":
                self.state = "abandoned"
            return self.state == "started"


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
        self._queue: asyncio.Queue[_Job] | None = None
        self._held: _Job | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpo-engine")
        self._busy = 0
        self.checkpointer: Checkpointer | None = None
        self._halted = False

    # ----------------------------------------------------------------- lifecycle
    def load(self) -> None:
        """Build the model, optimizer and reference (slow: call off the event loop)."""
        bundle = self._bundle_factory()
        state = TrainState.create(bundle, self.settings)  # the frozen reference: initial weights
        if self.settings.checkpoint_dir is not None:  # resume the latest valid checkpoint
            self.checkpointer = Checkpointer.open(
                self.settings.checkpoint_dir, self.settings.checkpoint_keep, state, self.events
            )
        self.bundle = bundle
        self.state = state
        self.events.on_loaded(self)

    async def start(self) -> None:
        """Load on the worker thread, then start the batcher."""
        loop = asyncio.get_running_loop()
        if self.bundle is None:
            await loop.run_in_executor(self._executor, self.load)
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._batch_loop(), name="dpo-batcher")
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
        self._halted = True
        self._fail_pending(ServiceError(ErrorCode.UNAVAILABLE, "the service is shutting down"))

    async def stop(self) -> None:
        """Stop the batcher and the worker (after :meth:`drain`)."""
        self.ready = False
        self.draining = True
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        self._fail_pending(ServiceError(ErrorCode.UNAVAILABLE, "the service is shutting down"))
        self._executor.shutdown(wait=True)
        if self.checkpointer is not None:
            self.checkpointer.close()

    def pending(self) -> int:
        """Requests queued or running."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return queued + (1 if self._held is not None else 0) + self._busy

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
        )

    def info(self) -> ModelInfo:
        bundle = self.require_bundle()
        param = next(bundle.model.parameters())
        return ModelInfo(
            name=bundle.name,
            kind=bundle.kind,
            parameters=sum(p.numel() for p in bundle.model.parameters()),
            vocab_size=bundle.vocab_size,
            max_seq_len=bundle.max_seq_len,
            dtype=str(param.dtype).removeprefix("torch."),
            device=str(param.device),
            model_version=self.version,
            tokenizer=bundle.tokenizer.name,
            reference=self.state is not None and self.state.reference is not None,
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
        """Write a checkpoint now, on the worker thread (after any running step)."""
        self._require_checkpointer()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._checkpoint_now
            )
        except RuntimeError as exc:  # executor shut down
            raise ServiceError(ErrorCode.UNAVAILABLE, f"the engine is stopped: {exc}") from None
        except (OSError, ValueError, TypeError) as exc:
            log.exception("checkpoint failed")
            raise ServiceError(
                ErrorCode.INTERNAL, f"checkpoint failed: {type(exc).__name__}: {exc}"
            ) from None

    async def checkpoints(self) -> dict[str, Any]:
        """The checkpoints on disk (verified) and the live weights' digest."""
        ckpt, state = self._require_checkpointer(), self.state
        assert state is not None
        listing = await asyncio.to_thread(ckpt.store.describe)
        live = await asyncio.get_running_loop().run_in_executor(self._executor, ckpt.live, state)
        return {**listing, "live": live}

    def _checkpoint_now(self) -> CheckpointInfo:
        """Worker thread: checkpoint the current state (no-op if this version is saved)."""
        assert self.state is not None and self.checkpointer is not None
        return self.checkpointer.save(self.state)

    # ----------------------------------------------------------------- submission
    def check_accepting(self) -> None:
        """Raise UNAVAILABLE while loading or draining."""
        if self.draining:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the service is draining", retry_after_s=1.0)
        if not self.ready or self._queue is None:
            raise ServiceError(
                ErrorCode.UNAVAILABLE, "the model is still loading", retry_after_s=1.0
            )

    async def submit(
        self, request: PreparedRequest, *, timeout_s: float | None = None
    ) -> LossResponse:
        """Queue ``request``; wait for its result. Raises :class:`ServiceError`."""
        self.check_accepting()
        assert self._queue is not None
        if self._queue.qsize() >= self.settings.max_queue:
            self.events.on_rejected_overload()
            raise ServiceError(
                ErrorCode.OVERLOADED,
                f"the queue is full ({self.settings.max_queue} waiting); retry later",
                retry_after_s=1.0,
            )
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), time.monotonic() + timeout)
        self._queue.put_nowait(job)
        self.events.on_queue_depth(self._queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout)
        except asyncio.TimeoutError:
            job.abandon()
            job.future.cancel()
            raise ServiceError(
                ErrorCode.DEADLINE_EXCEEDED, f"the request did not finish within {timeout:.3g} s"
            ) from None
        except asyncio.CancelledError:
            job.abandon()  # client went away: drop it if it has not started
            job.future.cancel()
            raise

    # ----------------------------------------------------------------- batcher
    async def _next_job(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def _live(self, job: _Job) -> bool:
        """Drop jobs whose caller left or whose deadline passed, before the model sees them."""
        self.events.on_queue_depth(self._queue.qsize() if self._queue is not None else 0)
        if self._halted:
            if not job.future.done():
                job.future.set_exception(
                    ServiceError(ErrorCode.UNAVAILABLE, "the service is shutting down")
                )
            self.events.on_dropped("shutdown")
            return False
        if job.future.done():
            self.events.on_dropped("cancelled")
            return False
        if job.expired(time.monotonic()):
            job.future.set_exception(
                ServiceError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while queued")
            )
            self.events.on_dropped("deadline")
            return False
        return True

    async def _collect(self, first: _Job) -> list[_Job]:
        """Coalesce loss-only jobs after ``first`` up to the token budget and max wait."""
        batch = [first]
        if first.request.train or not self.settings.dynamic_batching:
            return batch
        tokens = first.request.batch_tokens
        wait_until = time.monotonic() + self.settings.max_wait_ms / 1000.0
        while tokens < self.settings.max_batch_tokens:
            nxt = await self._next_job(wait_until - time.monotonic())
            if nxt is None:
                break
            if not self._live(nxt):
                continue
            if (
                nxt.request.train
                or tokens + nxt.request.batch_tokens > self.settings.max_batch_tokens
            ):
                self._held = nxt  # runs next, keeping arrival order
                break
            batch.append(nxt)
            self._busy += 1
            tokens += nxt.request.batch_tokens
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._next_job(None)
            if job is None or not self._live(job):
                continue
            self._busy += 1  # counted until its future is settled (drain waits on this)
            batch = [job]
            try:
                batch = await self._collect(job)
                started = time.monotonic()
                for j in batch:
                    self.events.on_queue_time(started - j.enqueued_at)
                results = await loop.run_in_executor(self._executor, self._run, batch)
                for j, result in zip(batch, results, strict=True):
                    if j.future.done():
                        continue
                    if isinstance(result, BaseException):
                        j.future.set_exception(result)
                    else:
                        j.future.set_result(result)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - defensive: keep the batcher alive
                log.exception("batcher failure")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(ServiceError(ErrorCode.INTERNAL, "engine failure"))
            finally:
                self._busy -= len(batch)

    def _fail_pending(self, error: ServiceError) -> None:
        jobs = [self._held] if self._held is not None else []
        self._held = None
        while self._queue is not None and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    # ----------------------------------------------------------------- worker thread
    def _run(self, batch: list[_Job]) -> list[LossResponse | BaseException]:
        """Runs on the worker thread: the only place model work happens."""
        assert self.state is not None
        live = [j for j in batch if j.claim()]
        results: dict[int, LossResponse | BaseException] = {}
        for j in batch:
            if j.state == "abandoned":
                self.events.on_dropped("deadline")
                results[id(j)] = ServiceError(
                    ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before the model was free"
                )
        if live:
            for j, r in zip(live, self._run_live(live), strict=True):
                results[id(j)] = r
        return [results[id(j)] for j in batch]

    def _run_live(self, batch: list[_Job]) -> list[LossResponse | BaseException]:
        assert self.state is not None
        self.events.on_batch(len(batch), sum(j.request.num_pairs for j in batch))
        if len(batch) == 1 and batch[0].request.train:
            return [self._run_train(batch[0].request)]
        try:
            return self._run_loss(batch)
        except ServiceError as exc:
            return [exc for _ in batch]
        except Exception as exc:
            log.exception("loss batch failed")
            return [
                ServiceError(ErrorCode.INTERNAL, f"model error: {type(exc).__name__}")
                for _ in batch
            ]

    def _run_train(self, request: PreparedRequest) -> LossResponse | BaseException:
        assert self.state is not None
        before = self.state.version
        try:
            response = run_train_step(self.state, request, self.settings)
        except ServiceError as exc:
            if exc.code is ErrorCode.INVALID_ARGUMENT and "non-finite" in exc.message:
                self.events.on_step_rejected()
            return exc
        except Exception as exc:
            log.exception("train step failed (request_id=%s)", request.request_id)
            return ServiceError(ErrorCode.INTERNAL, f"train step failed: {type(exc).__name__}")
        if self.state.version == before:
            return response  # a retried request_id: nothing was applied
        self.events.on_step(self, response)
        every = self.settings.checkpoint_every
        if self.checkpointer is not None and every > 0 and self.state.version % every == 0:
            try:
                self._checkpoint_now()
            except Exception as exc:
                log.exception("checkpoint at version %d failed", self.state.version)
                return ServiceError(
                    ErrorCode.INTERNAL,
                    f"the step was applied (model version {self.state.version}) but its "
                    f"checkpoint failed ({type(exc).__name__}); it is not durable yet",
                )
        return response

    def _run_loss(self, batch: list[_Job]) -> list[LossResponse | BaseException]:
        assert self.state is not None
        pairs = [p for j in batch for p in j.request.pairs]
        frozen_needed = [j.request.reference == "frozen" for j in batch]
        with torch.inference_mode():
            policy = forward_logps(self.state.bundle.causal_lm, pairs, self.settings, self.state)
            reference = None
            if any(frozen_needed):
                assert self.state.reference is not None, "prepare() admits frozen only with a copy"
                reference = forward_logps(self.state.reference, pairs, self.settings, self.state)
        results: list[LossResponse | BaseException] = []
        start = 0
        version = self.state.version
        for job in batch:
            n = job.request.num_pairs
            rows = slice(start, start + n)
            start += n
            try:
                results.append(
                    build_response(
                        job.request, policy, reference, rows, version, request_id=_rid(job)
                    )
                )
            except ServiceError as exc:
                results.append(exc)
        return results


def _rid(job: _Job) -> str:
    return job.request.request_id or uuid.uuid4().hex


def describe(engine: Engine) -> dict[str, Any]:
    """Small status dict for logs and the readiness endpoint."""
    return {"ready": engine.ready, "draining": engine.draining, "version": engine.version}
