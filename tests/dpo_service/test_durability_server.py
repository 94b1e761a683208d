"""Durability on a running server (issue 10, items 3 and 4): a failed due checkpoint pauses
training until one succeeds (both protocols), the directory must be writable at start, a
failed final checkpoint exits non-zero, and a checkpoint on disk is verified before it is
trusted (an on-demand or final checkpoint rewrites a damaged one).

Disk faults are real where the machine allows (a tiny tmpfs that fills up, a read-only
remount; a chmod'ed directory when not root) and injected at the store's write calls
otherwise: see ``disk_faults.py``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from ckpt_helpers import flip_byte, truncate
from conftest import API_KEY, running_server, small_settings
from disk_faults import DiskFault
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.engine.admission import make_engine
from dpo_service.server import start
from dpo_service.state.format import OPTIM_TENSORS_FILE, WEIGHTS_FILE, CheckpointError
from dpo_service.state.store import CheckpointStore
from server_process import AUTH

pytestmark = pytest.mark.timeout(180)

PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
]
GRPC_AUTH = (("authorization", f"Bearer {API_KEY}"),)


def _touch_directory(directory: Path) -> None:
    """Start and stop an engine on ``directory`` (it then holds a record and a lock file)."""
    engine = make_engine(small_settings(enable_grpc=False, checkpoint_dir=directory))
    engine.load()
    asyncio.run(engine.stop())


# ---------------------------------------------------------------------- item 3: degraded
def _train(c: httpx.Client, request_id: str) -> httpx.Response:
    body = {"pairs": PAIRS, "train": True, "request_id": request_id}
    return c.post("/dpo/loss", json=body, headers=AUTH)


def _grpc_pairs() -> list[Any]:
    return [
        pb.PreferencePair(
            text=pb.TextTriple(prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"])
        )
        for p in PAIRS
    ]


def _grpc_train(stub: Any, request_id: str) -> Any:
    req = pb.ComputeLossRequest(pairs=_grpc_pairs(), train=True, request_id=request_id)
    return stub.ComputeLoss(req, metadata=GRPC_AUTH, timeout=60)


def _grpc_error(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@pytest.fixture
def fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskFault]:
    disk = DiskFault(tmp_path, monkeypatch)
    try:
        yield disk
    finally:
        disk.close()


@pytest.mark.slow
def test_failed_due_checkpoint_pauses_training_on_both_protocols(fault: DiskFault) -> None:
    """The disk fills up: the step due a checkpoint is answered 503 / UNAVAILABLE (applied in
    memory, not durable), every train request (retries of it included) gets the same answer
    on both protocols, loss-only goes on, readiness says degraded; once space is back the
    next train request retries the checkpoint and training resumes where it was."""
    settings = {"checkpoint_dir": fault.dir, "checkpoint_every": 1, "checkpoint_retry_s": 60}
    with (
        running_server(**settings) as srv,
        httpx.Client(base_url=srv.http_url, timeout=60) as c,
        grpc.insecure_channel(srv.grpc_target) as channel,
    ):
        stub = pb_grpc.DpoServiceStub(channel)
        assert _train(c, "a").status_code == 200
        fault.fill()
        failed = _train(c, "b")
        assert failed.status_code == 503, failed.text
        detail = failed.json()["detail"]
        assert failed.json()["code"] == "unavailable" and failed.headers["retry-after"] == "60"
        assert "checkpoint of model version 2 failed" in detail and "not durable" in detail
        assert "last durable checkpoint is version 1" in detail and fault.expected in detail
        assert srv.version == 2  # applied in memory
        for rid in ("b", "c"):  # the failed step's retry, and a new step: the same answer
            again = _train(c, rid)
            assert again.status_code == 503 and again.json()["detail"] == detail
        for rid in ("b", "d"):
            err = _grpc_error(_grpc_train, stub, rid)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == detail
        # hostile input while paused: still the validation error, and nothing changes
        bad = c.post("/dpo/loss", json={"pairs": [], "train": True}, headers=AUTH)
        assert bad.status_code == 422, bad.text
        empty = pb.ComputeLossRequest(pairs=[], train=True, request_id="bad")
        err = _grpc_error(lambda: stub.ComputeLoss(empty, metadata=GRPC_AUTH, timeout=60))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        loss = c.post("/dpo/loss", json={"pairs": PAIRS})
        assert loss.status_code == 200 and loss.json()["model_version"] == 2
        grpc_loss = stub.ComputeLoss(pb.ComputeLossRequest(pairs=_grpc_pairs()), timeout=60)
        assert grpc_loss.model_version == 2
        ready = c.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["degraded"] is True and ready.json()["reason"] == detail
        assert _metric(c, "dpo_degraded") == 1.0
        assert srv.version == 2  # nothing applied while paused
        fault.free()
        time.sleep(1.1)  # past the per-request retry's rate limit (one attempt a second)
        replay = _train(c, "b")  # retries the checkpoint first: it succeeds
        assert replay.status_code == 200, replay.text
        assert replay.json()["new_model_version"] == 2 and replay.json()["request_id"] == "b"
        assert srv.version == 2  # answered from the record: not applied twice
        assert _grpc_train(stub, "d").new_model_version == 3
        ready = c.get("/health/ready").json()
        assert ready["degraded"] is False and "reason" not in ready
        assert _metric(c, "dpo_degraded") == 0.0
    store = CheckpointStore(fault.dir)
    assert [store.verify(fault.dir / f"ckpt-{v:012d}").version for v in (2, 3)] == [2, 3]


@pytest.mark.slow
def test_the_checkpoint_is_retried_in_the_background(fault: DiskFault) -> None:
    """Without any request, the retry every DPO_CHECKPOINT_RETRY_S ends the degraded state."""
    settings = {
        "enable_grpc": False,
        "checkpoint_dir": fault.dir,
        "checkpoint_every": 1,
        "checkpoint_retry_s": 0.2,
    }
    with running_server(**settings) as srv, httpx.Client(base_url=srv.http_url, timeout=60) as c:
        fault.fill()
        assert _train(c, "x").status_code == 503
        time.sleep(0.5)
        assert c.get("/health/ready").json()["degraded"] is True  # still failing
        fault.free()
        deadline = time.monotonic() + 15
        while c.get("/health/ready").json()["degraded"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/health/ready").json()["degraded"] is False
        assert (fault.dir / "ckpt-000000000001").is_dir()
        assert _train(c, "x").json()["new_model_version"] == 1


def test_start_up_refuses_a_read_only_directory(fault: DiskFault) -> None:
    """A real server's start-up fails with a clear error, before it is ready."""
    _touch_directory(fault.dir)
    fault.read_only()
    try:
        with pytest.raises(CheckpointError, match="is not writable") as info:
            asyncio.run(start(small_settings(checkpoint_dir=fault.dir)))
        assert fault.read_only_expected in str(info.value)
    finally:
        fault.writable()
    _touch_directory(fault.dir)  # and the lock was released


@pytest.mark.slow
def test_failed_final_checkpoint_exits_non_zero(fault: DiskFault, tmp_path: Path) -> None:
    """A real ``dpo-service serve``: one acknowledged (not yet durable) step, the disk fills
    up, SIGTERM: the final checkpoint fails and the process exits 3, saying so."""
    srv = fault.server_process(tmp_path / "server.log")
    try:
        srv.wait_ready()
        with srv.client() as c:
            assert _train(c, "only").status_code == 200
        fault.fill()
        srv.signal(signal.SIGTERM)
        assert srv.wait(60) == 3, srv.log()
    finally:
        srv.close()
    assert "the final checkpoint failed" in srv.log() and "NOT durable" in srv.log()


# ---------------------------------------------------------------------- item 4: verify on disk
@pytest.mark.slow
def test_on_demand_and_final_checkpoints_rewrite_a_damaged_one(tmp_path: Path) -> None:
    """The newest checkpoint is damaged while the server runs: a checkpoint at the same
    version verifies the disk and writes it again (HTTP, then gRPC, then at shutdown)."""
    store = CheckpointStore(tmp_path)
    path = tmp_path / "ckpt-000000000002"
    with (
        running_server(checkpoint_dir=tmp_path, checkpoint_every=2) as srv,
        httpx.Client(base_url=srv.http_url, timeout=60) as c,
        grpc.insecure_channel(srv.grpc_target) as channel,
    ):
        assert [_train(c, f"s-{i}").status_code for i in range(2)] == [200, 200]
        written = store.verify(path)
        flip_byte(path / WEIGHTS_FILE, -5)
        made = c.post("/admin/checkpoint", headers=AUTH)
        assert made.status_code == 200 and made.json()["version"] == 2
        again = store.verify(path)  # on disk again, and what the answer says
        assert (
            made.json()["files"] == again.files and again.weights_sha256 == written.weights_sha256
        )
        truncate(path / OPTIM_TENSORS_FILE)
        res = pb_grpc.DpoServiceStub(channel).Checkpoint(
            pb.CheckpointRequest(), metadata=GRPC_AUTH, timeout=60
        )
        assert res.model_version == 2 and store.verify(path).version == 2
        untouched = c.post("/admin/checkpoint", headers=AUTH).json()  # valid: nothing written
        assert untouched["files"] == store.verify(path).files
        (path / WEIGHTS_FILE).unlink()
    assert store.verify(path).weights_sha256 == written.weights_sha256  # the final checkpoint
    assert not list(tmp_path.glob("*.damaged-*"))  # our own copy: replaced, not kept
