"""Admission queue and dynamic batcher in front of the engine's worker thread.

One coroutine takes requests from a bounded queue in arrival order:

- loss-only requests are coalesced (up to ``max_batch_tokens`` padded positions and
  ``max_wait_ms`` of waiting) into one call of the worker;
- a train request always runs alone, and a request that would break the order or the budget
  is held back to start the next batch, so arrival order is kept;
- a full queue refuses at once (OVERLOADED); a request whose caller left or whose deadline
  passed is dropped before the worker sees it (claimed atomically, see :class:`Job`).

The batcher never touches the model: it hands batches to ``run``, which the engine runs on
its worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from dpo_service.engine.events import EngineEvents
from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.results import LossResult
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.settings import Settings

log = logging.getLogger(__name__)

Result = LossResult | BaseException
#: A caller cancelled this close to its deadline was cancelled by the deadline.
DEADLINE_SLACK_S = 0.05
RunBatch = Callable[[list["Job"]], Awaitable[Sequence[Result]]]


@dataclass
class Job:
    """One admitted request and the future its caller waits on."""

    request: PreparedRequest
    future: asyncio.Future[LossResult]
    deadline: float | None
    enqueued_at: float = field(default_factory=time.monotonic)
    # "queued" → "started" (claimed by the worker) or "abandoned" (caller gave up); the lock
    # makes the two transitions exclusive, so abandoned work never reaches the model.
    state: str = "queued"
    lock: threading.Lock = field(default_factory=threading.Lock)
    # why an abandoned job was dropped (``dpo_dropped_requests_total{reason}``): "cancelled"
    # (the caller went away: a cancelled gRPC call, a closed HTTP connection) or "deadline"
    drop_reason: str = "deadline"

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def abandon(self, reason: str = "cancelled") -> None:
        with self.lock:
            if self.state == "queued":
                self.state = "abandoned"
                self.drop_reason = reason

    def claim(self) -> bool:
        """Called on the worker thread right before model work: False if it must be dropped."""
        with self.lock:
            if self.state == "queued" and not self.expired(time.monotonic()):
                self.state = "started"
            elif self.state == "queued":
                self.state = "abandoned"
                self.drop_reason = "deadline"
            return self.state == "started"


class Batcher:
    """Bounded FIFO queue + coalescing loop; see the module docstring."""

    def __init__(self, settings: Settings, events: EngineEvents, run: RunBatch) -> None:
        self.settings = settings
        self.events = events
        self._run = run
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._held: Job | None = None
        self._busy = 0  # jobs taken from the queue whose futures are not settled yet
        self._admitting = 0  # accepted requests still being prepared (see admitting())
        self._halted = False
        self._task: asyncio.Task[None] = asyncio.create_task(self._loop(), name="dpo-batcher")

    # ------------------------------------------------------------------ admission
    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        """Count a request that was accepted and is still being prepared (off the event loop)
        as pending, so that a drain that begins meanwhile waits for it to be queued."""
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    async def submit(self, request: PreparedRequest, timeout: float) -> LossResult:
        """Queue ``request`` and wait for its result (at most ``timeout`` seconds)."""
        if self._halted:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the service is shutting down")
        if self._queue.qsize() >= self.settings.max_queue:
            self.events.on_rejected_overload()
            raise ServiceError(
                ErrorCode.OVERLOADED,
                f"the queue is full ({self.settings.max_queue} waiting); retry later",
                retry_after_s=1.0,
            )
        loop = asyncio.get_running_loop()
        job = Job(request, loop.create_future(), time.monotonic() + timeout)
        self._queue.put_nowait(job)
        self.events.on_queue_depth(self._queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout)
        except asyncio.TimeoutError:
            job.abandon("deadline")
            job.future.cancel()
            raise ServiceError(
                ErrorCode.DEADLINE_EXCEEDED, f"the request did not finish within {timeout:.3g} s"
            ) from None
        except asyncio.CancelledError:
            # the caller went away (or its own deadline, e.g. gRPC's, cancelled it): drop it
            # if it has not started
            job.abandon(
                "deadline" if job.expired(time.monotonic() + DEADLINE_SLACK_S) else "cancelled"
            )
            job.future.cancel()
            raise

    def pending(self) -> int:
        """Requests queued or running, or accepted and being prepared."""
        held = 1 if self._held is not None else 0
        return self._queue.qsize() + held + self._busy + self._admitting

    def halt(self, error: ServiceError) -> None:
        """Start nothing more; fail what is still waiting with ``error``."""
        self._halted = True
        self.fail_waiting(error)

    async def stop(self, error: ServiceError) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.fail_waiting(error)

    def fail_waiting(self, error: ServiceError) -> None:
        jobs = [self._held] if self._held is not None else []
        self._held = None
        while not self._queue.empty():
            jobs.append(self._queue.get_nowait())
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    # ------------------------------------------------------------------ the loop
    async def _next(self, timeout: float | None) -> Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
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

    def _live(self, job: Job) -> bool:
        """Drop jobs whose caller left or whose deadline passed, before the model sees them."""
        self.events.on_queue_depth(self._queue.qsize())
        reason = None
        if self._halted:
            reason, error = (
                "shutdown",
                ServiceError(ErrorCode.UNAVAILABLE, "the service is shutting down"),
            )
        elif job.future.done():  # abandoned by its caller: cancelled, or its wait timed out
            reason, error = job.drop_reason, None
        elif job.expired(time.monotonic()):
            reason = "deadline"
            error = ServiceError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while queued")
        if reason is None:
            return True
        if error is not None and not job.future.done():
            job.future.set_exception(error)
        self.events.on_dropped(reason)
        return False

    async def _collect(self, first: Job) -> list[Job]:
        """Coalesce loss-only jobs after ``first`` up to the token budget and max wait."""
        batch = [first]
        if first.request.train or not self.settings.dynamic_batching:
            return batch
        budget = self.settings.max_batch_tokens
        tokens = first.request.batch_tokens
        wait_until = time.monotonic() + self.settings.max_wait_ms / 1000.0
        while tokens < budget:
            nxt = await self._next(wait_until - time.monotonic())
            if nxt is None:
                break
            if not self._live(nxt):
                continue
            if nxt.request.train or tokens + nxt.request.batch_tokens > budget:
                self._held = nxt  # runs next, keeping arrival order
                break
            batch.append(nxt)
            self._busy += 1
            tokens += nxt.request.batch_tokens
        return batch

    async def _loop(self) -> None:
        while True:
            job = await self._next(None)
            if job is None or not self._live(job):
                continue
            self._busy += 1  # counted until its future is settled (drain waits on this)
            batch = [job]
            try:
                batch = await self._collect(job)
                started = time.monotonic()
                for j in batch:
                    self.events.on_queue_time(started - j.enqueued_at)
                results = await self._run(batch)
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
