"""Durability, round 2 (issue 10, items 2 and 14): a resume never destroys training (damaged
checkpoints at start: refusal naming each, fresh optimizer or fresh start only when allowed,
nothing newer pruned or overwritten), and the idempotency record is appended to, not
rewritten. Failed checkpoints on a running server (items 3 and 4) are in
``test_durability_server.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_helpers import flip_byte, truncate
from conftest import small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.engine.preparation import prepare
from dpo_service.engine.results import LossResult
from dpo_service.schemas import LossRequest
from dpo_service.state.format import (
    LATEST_FILE,
    OPTIM_TENSORS_FILE,
    RECORD_FILE,
    WEIGHTS_FILE,
    CheckpointCorrupt,
)
from dpo_service.state.record import IdempotencyRecord
from dpo_service.state.store import CheckpointStore

pytestmark = pytest.mark.timeout(180)

PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
]


# ---------------------------------------------------------------------- helpers
def _engine(directory: Path, **overrides: Any) -> Engine:
    engine = make_engine(small_settings(enable_grpc=False, checkpoint_dir=directory, **overrides))
    engine.load()
    return engine


def _stop(engine: Engine) -> None:
    asyncio.run(engine.stop())


def _step(engine: Engine, request_id: str | None = None) -> LossResult | BaseException:
    assert engine.bundle is not None
    body = LossRequest.model_validate({"pairs": PAIRS, "train": True, "request_id": request_id})
    return engine._train_one(prepare(body, engine.bundle.tokenizer, engine.limits()))


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    assert engine.bundle is not None
    return {k: v.clone() for k, v in engine.bundle.model.state_dict().items()}


def _tree(directory: Path) -> dict[str, bytes]:
    """Every checkpoint file's bytes (to show nothing was touched)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.glob("ckpt-*/*"))
        if p.is_file()
    }


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """A directory with checkpoints at versions 1, 2 and 3; the weights at version 3."""
    engine = _engine(tmp_path)
    for i in range(3):
        assert isinstance(_step(engine, f"req-{i}"), LossResult)
        engine._checkpoint_now()
    weights = _weights(engine)
    _stop(engine)
    yield tmp_path, weights


# ---------------------------------------------------------------------- item 2: resume
def test_start_is_refused_when_no_checkpoint_verifies(
    three: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Only the optimizer files are damaged (weights intact): start-up refuses, naming every
    checkpoint and why, and touches nothing; the lock is released."""
    directory, _ = three
    for v in (1, 2, 3):
        truncate(directory / f"ckpt-{v:012d}" / OPTIM_TENSORS_FILE)
    before = _tree(directory)
    with pytest.raises(CheckpointCorrupt) as info:
        _engine(directory)
    message = str(info.value)
    for v in (1, 2, 3):
        assert f"ckpt-{v:012d}: {OPTIM_TENSORS_FILE}" in message
    assert "truncated" in message and "DPO_ALLOW_FRESH_START=true" in message
    assert "DPO_ALLOW_FRESH_OPTIMIZER=true" in message  # the weights verify
    assert _tree(directory) == before
    _stop(_engine(directory, allow_fresh_optimizer=True))  # the lock was released


def test_fresh_optimizer_resumes_the_newest_weights_only_when_allowed(
    three: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    directory, weights = three
    truncate(directory / "ckpt-000000000003" / OPTIM_TENSORS_FILE)
    older = _engine(directory)  # not allowed: the previous fully valid checkpoint
    assert older.version == 2
    _stop(older)
    engine = _engine(directory, allow_fresh_optimizer=True)
    assert engine.version == 3 and engine.state is not None
    assert all(torch.equal(v, _weights(engine)[k]) for k, v in weights.items())
    assert engine.state.optimizer.state_dict()["state"] == {}  # fresh
    assert list(engine.state.completed) == ["req-0", "req-1", "req-2"]
    # the final checkpoint writes version 3 again; the damaged one is kept aside
    engine._checkpoint_now()
    _stop(engine)
    assert CheckpointStore(directory).verify(directory / "ckpt-000000000003").version == 3
    kept = list(directory.glob("ckpt-000000000003.damaged-*"))
    assert len(kept) == 1 and (kept[0] / WEIGHTS_FILE).is_file()


def test_fresh_start_keeps_every_damaged_checkpoint(
    three: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """DPO_ALLOW_FRESH_START: version 0 from the initial weights, and neither the checkpoint
    at 0 nor later ones prune or overwrite the damaged (newer) checkpoints."""
    directory, _ = three
    for v in (1, 2, 3):
        flip_byte(directory / f"ckpt-{v:012d}" / WEIGHTS_FILE, -5)
    damaged = _tree(directory)
    engine = _engine(directory, allow_fresh_start=True, checkpoint_keep=1)
    assert engine.version == 0
    engine._checkpoint_now()
    assert isinstance(_step(engine, "fresh-1"), LossResult)
    engine._checkpoint_now()  # version 1: the damaged ckpt-1 is moved aside, not deleted
    _stop(engine)
    assert {f"ckpt-{v:012d}" for v in (2, 3)} <= {p.name for p in directory.glob("ckpt-*")}
    assert all(
        _tree(directory)[k] == damaged[k] for k in damaged if not k.startswith("ckpt-000000000001")
    )
    aside = next(directory.glob("ckpt-000000000001.damaged-*"))
    assert (aside / WEIGHTS_FILE).read_bytes() == damaged[f"ckpt-000000000001/{WEIGHTS_FILE}"]
    assert not (directory / "ckpt-000000000000").exists()  # keep=1 pruned only the older one
    assert (directory / LATEST_FILE).read_text().strip() == "ckpt-000000000001"


def test_newest_valid_wins_over_latest_and_newer_damaged_is_never_pruned(
    three: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    directory, _ = three
    (directory / LATEST_FILE).write_text("ckpt-000000000001\n")
    engine = _engine(directory)
    assert engine.version == 3  # not LATEST's 1
    _stop(engine)
    for v in (2, 3):
        flip_byte(directory / f"ckpt-{v:012d}" / WEIGHTS_FILE, -5)
    engine = _engine(directory, checkpoint_keep=1)
    assert engine.version == 1
    assert isinstance(_step(engine, "new-2"), LossResult)
    engine._checkpoint_now()  # keep=1: prunes ckpt-1, never the newer damaged ckpt-3
    _stop(engine)
    assert sorted(p.name for p in directory.glob("ckpt-*") if "damaged" not in p.name) == [
        "ckpt-000000000002",
        "ckpt-000000000003",
    ]
    assert len(list(directory.glob("ckpt-000000000002.damaged-*"))) == 1  # kept aside
    assert CheckpointStore(directory).verify(directory / "ckpt-000000000002").version == 2


@pytest.mark.slow
def test_server_process_refuses_damaged_checkpoints(
    three: tuple[Path, dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A real ``dpo-service serve`` exits 1 and its log names each checkpoint and why."""
    from server_process import ServerProcess

    directory, _ = three
    for v in (1, 2, 3):
        truncate(directory / f"ckpt-{v:012d}" / OPTIM_TENSORS_FILE)
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    srv = ServerProcess(log_path, checkpoint_dir=directory)
    try:
        assert srv.wait(120) == 1
    finally:
        srv.close()
    log = srv.log()
    assert "start-up failed: no checkpoint in" in log
    assert all(f"ckpt-{v:012d}: {OPTIM_TENSORS_FILE}" in log for v in (1, 2, 3))


# ---------------------------------------------------------------------- item 14: the record
def test_the_record_is_appended_to_not_rewritten(tmp_path: Path) -> None:
    """One row per step whatever the record's size; no idempotency file in checkpoints."""
    engine = _engine(tmp_path, checkpoint_every=1)
    assert engine.checkpointer is not None
    record = engine.checkpointer.record
    for i in range(12):
        before = record.rows_written
        assert isinstance(_step(engine, f"r-{i}"), LossResult)
        assert record.rows_written == before + 1
    _stop(engine)
    assert not list(tmp_path.glob("ckpt-*/idempotency.json"))
    resumed = _engine(tmp_path)
    assert resumed.state is not None and len(resumed.state.completed) == 12
    _stop(resumed)


def test_rows_of_steps_newer_than_the_resumed_checkpoint_are_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is written before the checkpoint: when the checkpoint then fails and the
    process ends, the resumed (older) version's record does not answer the lost step's id."""
    import dpo_service.state.store as store_module

    engine = _engine(tmp_path, checkpoint_every=1)
    assert isinstance(_step(engine, "kept"), LossResult)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", disk_full)
    lost = _step(engine, "lost")
    assert not isinstance(lost, LossResult) and "not durable" in str(lost)
    assert engine.checkpointer is not None and engine.checkpointer.record.load()[-1][0] == "lost"
    _stop(engine)
    monkeypatch.undo()
    resumed = _engine(tmp_path)
    assert resumed.version == 1 and resumed.state is not None
    assert list(resumed.state.completed) == ["kept"]
    again = _step(resumed, "lost")  # applied (again): it was never durable
    assert isinstance(again, LossResult) and again.new_model_version == 2
    resumed._checkpoint_now()
    _stop(resumed)
    record = IdempotencyRecord(tmp_path / RECORD_FILE, 16)
    try:
        rows = record.load()
    finally:
        record.close()
    assert [(rid, body["new_model_version"]) for rid, body in rows] == [("kept", 1), ("lost", 2)]
