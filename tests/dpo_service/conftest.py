"""Shared fixtures: a real combined server (uvicorn + grpc.aio) on loopback in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import pytest

from dpo_service.server import RunningServer, start
from dpo_service.settings import Settings

# 32+ characters and no placeholder, as Settings requires (not a secret: tests only).
API_KEY = "test-key-0123456789abcdefghijklmnopqrstuv"

SMALL_MODEL: dict[str, Any] = {
    "builtin_d_model": 64,
    "builtin_layers": 2,
    "builtin_heads": 4,
    "builtin_kv_heads": 2,
    "builtin_max_seq_len": 256,
}


def small_settings(**overrides: Any) -> Settings:
    """Settings for a tiny built-in model on loopback with free ports."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "grpc_port": 0,
        "api_key": API_KEY,
        "lr": 1e-3,
        "log_level": "warning",
        "drain_timeout_s": 10.0,
        **SMALL_MODEL,
    }
    values.update(overrides)
    return Settings(**values)


class ServerThread:
    """A combined server running on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(start(settings), timeout=120)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run ``coro`` on the server's loop and wait for its result."""
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.running.grpc_port}"

    @property
    def core(self) -> Any:
        return self.running.admission

    @property
    def version(self) -> int:
        return int(self.running.admission.engine.version)

    def stop(self) -> None:
        try:
            self.call(self.running.shutdown(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


@contextmanager
def running_server(**overrides: Any) -> Iterator[ServerThread]:
    server = ServerThread(small_settings(**overrides))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """A keyed server (training needs the key) shared by a test module."""
    with running_server() as srv:
        yield srv


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
