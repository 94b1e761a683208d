"""Issue 13: a rank that dies. Killed mid-request, the request gets 503 / UNAVAILABLE (not a
hang), rank 0 turns not-ready and the world exits non-zero; killed while idle with torchrun
gone, rank 0's heartbeat notices and it exits by itself. (Same answers as world size 1:
``test_distributed.py``.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from server_process import AUTH
from torchrun_world import PAIRS, loss, start_world, wait_gone

pytestmark = pytest.mark.slow


def test_a_dead_rank_fails_requests_with_503_and_the_world_exits(tmp_path: Path) -> None:
    """SIGKILL of rank 1 while rank 0 runs a train step: the step is refused with 503 (not a
    hang, not applied), gRPC answers UNAVAILABLE, rank 0 turns not-ready and the world exits
    non-zero, within bounded times."""
    world = start_world(tmp_path, 2, "ddp", tmp_path / "ckpt", "dead", dist_timeout_s=20)
    try:
        big = [
            {"prompt": "tell me a long story " * 8, "chosen": " ok " * 20, "rejected": " no " * 20}
        ] * 32
        with world.client(timeout=60) as c:
            assert loss(c, PAIRS, beta=0.1, train=True)["new_model_version"] == 1
            pids = world.rank_pids()
            killer = threading.Timer(0.3, os.kill, (pids[1], signal.SIGKILL))
            killer.start()
            started = time.monotonic()
            r = c.post("/dpo/loss", json={"pairs": big * 2, "train": True}, headers=AUTH)
            waited = time.monotonic() - started
            killer.join()
            assert r.status_code == 503, r.text
            assert waited < 30
            assert "rank" in r.json()["detail"]
            try:
                ready = c.get("/health/ready").status_code
            except httpx.TransportError:
                ready = None  # already gone: not ready either
            assert ready != 200
        with grpc.insecure_channel(world.grpc_target) as channel:
            stub = pb_grpc.DpoServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.ComputeLoss(
                    pb.ComputeLossRequest(
                        pairs=[pb.PreferencePair(text=pb.TextTriple(**p)) for p in PAIRS]
                    ),
                    metadata=(("authorization", AUTH["Authorization"]),),
                    timeout=30,
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert wait_gone(world, 60) != 0
        text = world.log()
        assert "distributed world failed" in text
        assert "stopped at model version 1" in text  # the refused step never counted
    finally:
        world.close()


def test_an_idle_world_notices_a_dead_rank_without_its_launcher(tmp_path: Path) -> None:
    """torchrun gone (SIGKILL: it can no longer tear the world down), then rank 1 killed
    while no request runs: rank 0's heartbeat fails within a bounded time, it turns
    not-ready and exits by itself (no orphan serving with half a model)."""
    world = start_world(tmp_path, 2, "ddp", tmp_path / "ckpt", "idle", dist_heartbeat_s=0.5)
    try:
        pids = world.rank_pids()
        world.proc.kill()
        world.proc.wait(30)
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(pids[0]), world.log()
        assert "heartbeat failed" in world.log()
    finally:
        world.close()
        for pid in pids.values():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's parent may be slow to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
