"""Bounded queue and deadlines, tested the way Triton tests its queue policy.

The engine's single worker thread is held busy by a task the test parks on it (the only way to
freeze the model worker from outside at a chosen moment); everything else is the real server.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from conftest import API_KEY, ServerThread, running_server

PAIR = {"prompt": "Hi", "chosen": " hello", "rejected": " go away"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _park_worker(srv: ServerThread) -> threading.Event:
    """Occupy the engine's worker thread until the returned event is set."""
    release = threading.Event()
    srv.core.engine._executor.submit(release.wait, 60)
    return release


def _wait_until(predicate: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_full_queue_refuses_exactly_the_overflow() -> None:
    """One request runs (blocked), Q wait in the queue, N more are refused at once with 429 +
    Retry-After; after release every accepted request completes and each train request applied
    exactly one step."""
    queue, overflow = 4, 5
    with running_server(enable_grpc=False, max_queue=queue, request_timeout_s=60) as srv:
        start = srv.version
        release = _park_worker(srv)
        with httpx.Client(base_url=srv.http_url, timeout=60) as c, ThreadPoolExecutor(16) as pool:
            body = {"pairs": [PAIR], "train": True}
            first = pool.submit(c.post, "/dpo/loss", json=body, headers=AUTH)
            _wait_until(lambda: srv.core.engine.pending() == 1)
            queued = [
                pool.submit(c.post, "/dpo/loss", json=body, headers=AUTH) for _ in range(queue)
            ]
            _wait_until(lambda: srv.core.engine.pending() == 1 + queue)
            t0 = time.monotonic()
            refused = [c.post("/dpo/loss", json=body, headers=AUTH) for _ in range(overflow)]
            refusal_time = time.monotonic() - t0
            assert [r.status_code for r in refused] == [429] * overflow
            assert all(r.headers.get("retry-after") for r in refused)
            assert refusal_time < 5.0  # refused at once, not after waiting for the worker
            assert srv.version == start
            release.set()
            accepted = [f.result(timeout=60) for f in [first, *queued]]
        assert [r.status_code for r in accepted] == [200] * (1 + queue)
        assert srv.version == start + 1 + queue
        versions = sorted(r.json()["new_model_version"] for r in accepted)
        assert versions == list(range(start + 1, start + 2 + queue))


def test_deadline_passes_while_queued_never_reaches_the_model() -> None:
    """A train request whose deadline expires in the queue gets 504 and applies nothing."""
    with running_server(enable_grpc=False, request_timeout_s=0.5) as srv:
        start = srv.version
        release = _park_worker(srv)
        with httpx.Client(base_url=srv.http_url, timeout=30) as c:
            r = c.post("/dpo/loss", json={"pairs": [PAIR], "train": True}, headers=AUTH)
            assert r.status_code == 504, r.text
            assert r.json()["code"] == "deadline_exceeded"
            release.set()
            _wait_until(lambda: srv.core.engine.pending() == 0)
            assert srv.version == start
            dropped = c.get("/metrics").text
        assert 'dpo_dropped_requests_total{reason="' in dropped


def test_loading_server_is_not_ready() -> None:
    """Before the model is loaded: readiness 503, loss calls 503 with Retry-After."""
    with running_server(enable_grpc=False) as srv:
        srv.core.engine.ready = False
        try:
            with httpx.Client(base_url=srv.http_url, timeout=30) as c:
                assert c.get("/health/ready").status_code == 503
                r = c.post("/dpo/loss", json={"pairs": [PAIR]})
                assert r.status_code == 503 and r.headers.get("retry-after")
        finally:
            srv.core.engine.ready = True
