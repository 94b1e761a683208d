"""The combined server: one engine, HTTP (uvicorn) and gRPC (grpc.aio) in one process.

Lifecycle:
1. both listeners start at once; readiness is false (HTTP 503, gRPC health NOT_SERVING)
   while the model loads;
2. the engine loads (resuming the latest checkpoint when ``DPO_CHECKPOINT_DIR`` is set) and
   readiness turns true;
3. on SIGTERM/SIGINT readiness turns false, new requests get 503 / UNAVAILABLE, queued and
   in-flight requests finish (bounded by ``DPO_DRAIN_TIMEOUT_S``), a final checkpoint is
   written, the listeners close and the process exits 0 (3 when the final checkpoint failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from dpo_service.api.http.app import create_app
from dpo_service.api.http.errors import code_for_status
from dpo_service.api.http.protocol import ConnectionLimits, guarded_protocol
from dpo_service.engine.admission import Admission, bundle_factory, make_admission
from dpo_service.engine.distributed.follower import EXIT_WORLD_FAILED, Follower
from dpo_service.engine.distributed.wire import heartbeat
from dpo_service.engine.distributed.world import (
    World,
    WorldFailure,
    close_world,
    current,
    init_world,
)
from dpo_service.settings import Settings

log = logging.getLogger(__name__)

#: Exit status when the final checkpoint failed: acknowledged steps are not durable.
EXIT_NOT_DURABLE = 3
# EXIT_WORLD_FAILED (4): a rank of the torchrun world failed (issue 13; the same on every rank)
__all__ = ["EXIT_NOT_DURABLE", "EXIT_WORLD_FAILED", "RunningServer", "run", "serve", "start"]


class _Uvicorn(uvicorn.Server):
    """uvicorn server whose signal handling we own (the combined server drains first)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return


@dataclass
class RunningServer:
    """Handles of a started server (used by ``serve`` and by tests)."""

    admission: Admission
    http: _Uvicorn | None = None
    http_task: asyncio.Task[None] | None = None
    grpc: Any = None
    http_port: int | None = None
    grpc_port: int | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def shutdown(self) -> bool:
        """Drain, checkpoint, close listeners. False when the final checkpoint failed (the
        process then exits :data:`EXIT_NOT_DURABLE`)."""
        settings = self.admission.settings
        engine = self.admission.engine
        if self.grpc is not None:
            await self.grpc.set_serving(False)
        drained = await engine.drain(settings.drain_timeout_s)
        if not drained:
            log.warning("drain timeout: %d requests still pending", engine.pending())
        try:
            durable = await self.admission.on_shutdown()
        except Exception:
            log.exception("shutdown: the final checkpoint could not run")
            durable = False
        if self.grpc is not None:
            await self.grpc.stop(grace=1.0)
        if self.http is not None and self.http_task is not None:
            self.http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.http_task, timeout=max(5.0, settings.drain_timeout_s))
        await engine.stop()
        self.stopped.set()
        return durable


async def start(settings: Settings, admission: Admission | None = None) -> RunningServer:
    """Start the listeners, then load the model. Returns once the model is ready."""
    admission = admission or make_admission(settings)
    running = RunningServer(admission=admission)
    if settings.enable_grpc:
        from dpo_service.api.grpc.server import start_grpc_server

        running.grpc = await start_grpc_server(admission, settings)
        running.grpc_port = running.grpc.port
    if settings.enable_http:
        events = admission.engine.events
        config = uvicorn.Config(
            create_app(settings, admission=admission),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
            # header size/time, body time and connection limits (api/http/protocol.py)
            http=guarded_protocol(
                ConnectionLimits.of(settings),
                on_reject=lambda status: events.on_request(
                    "connection", "http", code_for_status(status), 0.0
                ),
            ),
            ws="none",
            access_log=False,  # RequestLog writes one line per request (with the client)
        )
        server = _Uvicorn(config)
        running.http = server
        running.http_task = asyncio.create_task(server.serve(), name="uvicorn")
        while not server.started:
            if running.http_task.done():
                running.http_task.result()  # re-raise the bind error
                raise RuntimeError("HTTP server exited during start-up")
            await asyncio.sleep(0.01)
        sockets = [s for srv in server.servers for s in srv.sockets]
        running.http_port = sockets[0].getsockname()[1] if sockets else settings.port
    try:
        await admission.start()
    except BaseException:
        await _close_listeners(running)
        raise
    if running.grpc is not None:
        await running.grpc.set_serving(True)
    log.info(
        "serving: http=%s grpc=%s model=%s version=%d",
        running.http_port,
        running.grpc_port,
        admission.engine.bundle.name if admission.engine.bundle else "?",
        admission.engine.version,
    )
    return running


async def _close_listeners(running: RunningServer) -> None:
    """Close whatever listeners started (used when the model fails to load)."""
    if running.grpc is not None:
        with contextlib.suppress(Exception):
            await running.grpc.stop(grace=0)
    if running.http is not None and running.http_task is not None:
        running.http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running.http_task, timeout=5)
    with contextlib.suppress(Exception):
        await running.admission.engine.stop()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit (a signal during loading is honoured
    once the model has loaded: the server then shuts down at once). Returns the exit status:
    0, :data:`EXIT_NOT_DURABLE` when the final checkpoint failed, or
    :data:`EXIT_WORLD_FAILED` when a torchrun rank failed (rank 0 then writes no final
    checkpoint: a step may have stopped half-way; the last periodic one is what resumes)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    admission = make_admission(settings)
    world = current()
    if world is not None:  # a failed rank: not ready at once, then drain and exit 4

        def broken(reason: str) -> None:
            admission.engine.ready = False
            loop.call_soon_threadsafe(stop.set)

        world.on_broken = broken
    running = await start(settings, admission)
    waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
    if world is not None:
        beat = asyncio.create_task(_heartbeat(admission, world, settings.dist_heartbeat_s))
        waiters.append(beat)
    if running.http_task is not None:
        waiters.append(running.http_task)  # type: ignore[arg-type]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down: draining in-flight requests")
    durable = await running.shutdown()
    log.info("stopped at model version %d", running.admission.engine.version)
    if world is not None and world.broken is not None:
        return EXIT_WORLD_FAILED
    return 0 if durable else EXIT_NOT_DURABLE


async def _heartbeat(admission: Admission, world: World, every_s: float) -> None:
    """Rank 0: every ``every_s`` an all-rank agreement on the worker thread (between
    batches); returns when it fails (the world is broken: ``on_broken`` stops the server)."""
    engine = admission.engine
    while not engine.draining:
        await asyncio.sleep(every_s)
        if engine.draining:
            return
        try:
            await engine.on_worker(heartbeat, world)
        except Exception:
            log.error("heartbeat failed: a rank is gone")
            return


def run(settings: Settings) -> int:
    """``dpo-service serve``: join the torchrun world when there is one (rank 0 serves, the
    other ranks follow it), run until shutdown, return the exit status."""
    world = init_world(settings)
    try:
        if world is not None and not world.is_leader:
            follower = Follower(settings, world, bundle_factory(settings))
            follower.load()
            return follower.run()
        return asyncio.run(serve(settings))  # 3 when the final checkpoint failed
    except WorldFailure as exc:
        log.error("start-up failed: %s", exc.reason)
        return EXIT_WORLD_FAILED
    finally:
        close_world()
