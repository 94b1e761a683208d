"""Lifecycle of a real ``python -m dpo_service serve`` process: SIGTERM drains in-flight work,
refuses new work, writes a final checkpoint and exits 0; start-up refuses a checkpoint of
another model; every request's log line carries the id its response echoes."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import running_server, small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.state.store import LATEST_FILE, CheckpointStore
from server_process import AUTH, ServerProcess

pytestmark = pytest.mark.timeout(180)


def _heavy(i: int) -> dict[str, Any]:
    """A train request that keeps the tiny model busy for a few tenths of a second."""
    pairs = [
        {"prompt": f"{'p' * 100}{i}-{j}", "chosen": "c" * 60, "rejected": "r" * 60}
        for j in range(32)
    ]
    return {"pairs": pairs, "train": True, "request_id": f"heavy-{i}"}


def _send_all(srv: ServerProcess, n: int) -> tuple[list[threading.Thread], dict[int, Any]]:
    results: dict[int, Any] = {}

    def send(i: int) -> None:
        with srv.client() as c:
            try:
                results[i] = c.post("/dpo/loss", json=_heavy(i), headers=AUTH)
            except httpx.TransportError as exc:
                results[i] = exc

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _wait_for_a_batch(srv: ServerProcess, timeout_s: float = 30.0) -> None:
    """Until the engine has started its first batch (``dpo_batch_requests_count`` >= 1)."""
    deadline = time.monotonic() + timeout_s
    with srv.client() as c:
        while time.monotonic() < deadline:
            for line in c.get("/metrics").text.splitlines():
                if line.startswith("dpo_batch_requests_count") and float(line.split()[-1]) >= 1:
                    return
            time.sleep(0.02)
    raise AssertionError("the engine started no batch within the time limit")


@pytest.mark.slow
def test_sigterm_drains_in_flight_work_checkpoints_and_exits_0(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    srv = ServerProcess(tmp_path / "server.log", checkpoint_dir=ckpt, drain_timeout_s=60)
    try:
        srv.wait_ready()
        threads, results = _send_all(srv, 6)
        time.sleep(0.5)  # all six admitted; the engine works through them one at a time
        srv.signal(signal.SIGTERM)
        refused: list[Any] = []
        with srv.client(timeout=10) as c:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not refused:
                try:
                    ready = c.get("/health/ready")
                except httpx.TransportError:
                    break
                if ready.status_code == 503:
                    try:
                        refused.append(c.post("/dpo/loss", json=_heavy(99), headers=AUTH))
                    except httpx.TransportError as exc:  # the listener closed meanwhile
                        refused.append(exc)
                time.sleep(0.02)
        for t in threads:
            t.join(60)
        assert srv.wait(60) == 0, srv.log()
    finally:
        srv.close()
    assert refused, "never saw readiness go 503 while draining"
    if isinstance(refused[0], httpx.Response):
        assert refused[0].status_code == 503 and refused[0].json()["code"] == "unavailable"
        assert "draining" in refused[0].json()["detail"]
    statuses = [r.status_code if isinstance(r, httpx.Response) else r for r in results.values()]
    assert statuses == [200] * 6, statuses
    versions = sorted(r.json()["new_model_version"] for r in results.values())
    assert versions == [1, 2, 3, 4, 5, 6]
    assert (ckpt / LATEST_FILE).read_text().strip() == "ckpt-000000000006"
    assert CheckpointStore(ckpt).verify(ckpt / "ckpt-000000000006").version == 6
    log = srv.log()
    assert "shutting down: draining" in log and "final checkpoint: model version 6" in log


@pytest.mark.slow
def test_drain_timeout_bounds_shutdown(tmp_path: Path) -> None:
    """With a short drain timeout, the running step finishes, what is still queued gets 503,
    and the final checkpoint holds exactly the acknowledged steps."""
    ckpt = tmp_path / "ckpt"
    srv = ServerProcess(tmp_path / "server.log", checkpoint_dir=ckpt, drain_timeout_s=0.2)
    try:
        srv.wait_ready()
        threads, results = _send_all(srv, 8)
        _wait_for_a_batch(srv)  # one step is running (a fixed sleep raced a loaded machine)
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        assert srv.wait(30) == 0, srv.log()
        elapsed = time.monotonic() - started
        for t in threads:
            t.join(30)
    finally:
        srv.close()
    assert elapsed < 10, elapsed
    ok = [r for r in results.values() if isinstance(r, httpx.Response) and r.status_code == 200]
    refused = [r for r in results.values() if r not in ok]
    assert ok and refused, results
    assert all(isinstance(r, httpx.Response) and r.status_code == 503 for r in refused), refused
    latest = (ckpt / LATEST_FILE).read_text().strip()
    assert latest == f"ckpt-{len(ok):012d}"
    assert max(r.json()["new_model_version"] for r in ok) == len(ok)


@pytest.mark.slow
def test_start_up_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    engine = make_engine(small_settings(checkpoint_dir=ckpt))  # d_model 64
    engine.load()
    engine._checkpoint_now()
    asyncio.run(engine.stop())
    other = ServerProcess(tmp_path / "other.log", checkpoint_dir=ckpt, builtin_d_model=32)
    try:
        assert other.wait(120) == 1
    finally:
        other.close()
    log = other.log()
    assert "was written for a different model; refusing to resume" in log
    assert "d_model: checkpoint 64 != loaded 32" in log


def test_log_line_of_each_request_carries_its_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dpo_service.api.http")
    pairs = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    with running_server(enable_grpc=False) as srv, httpx.Client(base_url=srv.http_url) as c:
        by_header = c.post("/dpo/loss", json={"pairs": pairs}, headers={"X-Request-ID": "hdr-1"})
        by_body = c.post("/dpo/loss", json={"pairs": pairs, "request_id": "body-2"})
        assigned = c.post("/dpo/loss", json={"pairs": pairs})
        refused = c.post("/dpo/loss", json={"pairs": pairs, "train": True, "request_id": "t-3"})
    lines = [r.getMessage() for r in caplog.records if "http_request" in r.getMessage()]
    for response, rid in [
        (by_header, "hdr-1"),
        (by_body, "body-2"),
        (assigned, assigned.json()["request_id"]),
        (refused, "t-3"),
    ]:
        assert response.headers["x-request-id"] == rid
        assert any(f"request_id={rid}" in line and "path=/dpo/loss" in line for line in lines)
        if response is not by_header:  # a tracing header is echoed, never adopted by the body
            assert response.json()["request_id"] == rid
    assert by_header.json()["request_id"] not in (None, "hdr-1")
    assert refused.status_code == 401
    assert any("status=401" in line and "request_id=t-3" in line for line in lines)
