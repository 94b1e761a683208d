"""Training pauses when a due checkpoint fails (issue 10, item 3: durable means durable).

A train step at a multiple of ``DPO_CHECKPOINT_EVERY`` is acknowledged only once its
checkpoint is on disk. When that checkpoint fails (disk full, read-only directory, any I/O
error) the engine becomes **degraded**:

- the step that triggered it is answered 503 / UNAVAILABLE with :attr:`Durability.reason`
  (its update is applied in memory, not durable) and its ``request_id`` is remembered, so a
  retry gets the same answer while degraded and the step's result once a checkpoint holds it;
- every train request is refused with the same answer, in admission, before it is queued
  (loss-only requests are served);
- ``/health/ready`` stays 200 (loss-only works) with ``"degraded": true`` and the reason, the
  ``dpo_degraded`` gauge is 1, gRPC health stays SERVING;
- the checkpoint is retried every ``DPO_CHECKPOINT_RETRY_S`` seconds, on a train request
  (at most one attempt per second, shared by concurrent requests) and by an on-demand
  checkpoint; the first that succeeds ends the degraded state and training resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from dpo_service.engine.events import EngineEvents
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.state.format import CheckpointInfo

log = logging.getLogger(__name__)

Attempt = Callable[[], Awaitable[object]]


class Durability:
    """The degraded state and the checkpoint retries (see the module docstring)."""

    def __init__(self, events: EngineEvents, retry_s: float) -> None:
        self.events = events
        self.retry_s = retry_s
        self.min_interval_s = min(1.0, retry_s)
        self.reason: str | None = None  # set while degraded
        self._last_attempt = 0.0
        self._inflight: asyncio.Future[None] | None = None
        self._loop: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        return self.reason is not None

    def error(self) -> ServiceError:
        """The answer to a train request while degraded."""
        return ServiceError(
            ErrorCode.UNAVAILABLE, self.reason or "training is paused", retry_after_s=self.retry_s
        )

    # ------------------------------------------------------------ worker thread
    def fail(
        self, version: int, durable: CheckpointInfo | None, exc: BaseException
    ) -> ServiceError:
        """The checkpoint due at ``version`` failed (``durable``: the newest checkpoint of
        this run's state, if any): pause training; returns the error to answer."""
        last = (
            f"the last durable checkpoint is version {durable.version}"
            if durable is not None
            else "no checkpoint holds this run's steps yet"
        )
        self.reason = (
            f"training is paused: the checkpoint of model version {version} failed "
            f"({type(exc).__name__}: {exc}); the steps up to version {version} are applied in "
            f"memory but not durable ({last}). Train requests get this answer until a "
            f"checkpoint succeeds (retried every {self.retry_s:g} s); loss-only requests are "
            "served"
        )
        self.events.on_degraded(True)
        log.error("degraded: %s", self.reason)
        return self.error()

    def recovered(self, version: int) -> None:
        """A checkpoint of the live state (``version``) succeeded."""
        if self.reason is None:
            return
        self.reason = None
        self.events.on_degraded(False)
        log.warning("checkpoint of model version %d succeeded: training resumes", version)

    # ------------------------------------------------------------ event loop
    def start(self, attempt: Attempt) -> None:
        """Retry every ``retry_s`` seconds while degraded (a task on the running loop)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.retry_s)
                if self.degraded:
                    await self.retry(attempt, rate_limited=False)

        self._loop = asyncio.get_running_loop().create_task(loop(), name="checkpoint-retry")

    async def check(self, attempt: Attempt, *, retry: bool = True) -> None:
        """Admission of a train request: while degraded, one retry (shared, rate-limited)
        when ``retry``, then :meth:`error` unless it succeeded."""
        if self.degraded and retry:
            await self.retry(attempt)
        if self.degraded:
            raise self.error()

    async def retry(self, attempt: Attempt, *, rate_limited: bool = True) -> None:
        """One checkpoint attempt, shared with any attempt in flight; with ``rate_limited``
        none when the last began less than a second ago. Failures are logged, not raised."""
        if self._inflight is None:
            if rate_limited and time.monotonic() - self._last_attempt < self.min_interval_s:
                return
            self._last_attempt = time.monotonic()
            self._inflight = asyncio.ensure_future(self._attempt(attempt))
            self._inflight.add_done_callback(self._clear_inflight)
        await asyncio.shield(self._inflight)

    def _clear_inflight(self, _: object) -> None:
        self._inflight = None

    @staticmethod
    async def _attempt(attempt: Attempt) -> None:
        try:
            await attempt()
        except Exception as exc:  # reported by the degraded state
            log.warning("checkpoint retry failed: %s: %s", type(exc).__name__, exc)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop
            self._loop = None
