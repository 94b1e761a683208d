"""Checkpoint format: atomic save, verified load, fallback past corrupt ones, keep-K, refusal
of a checkpoint written for another model. The engine is driven on the test thread (it is
what its worker thread would run), without servers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.engine.preparation import prepare
from dpo_service.engine.results import LossResult
from dpo_service.schemas import LossRequest
from dpo_service.state.files import (
    model_config_of,
    sha256_file,
    tokenizer_identity,
    weights_digest,
)
from dpo_service.state.format import (
    LATEST_FILE,
    MANIFEST_FILE,
    OPTIM_TENSORS_FILE,
    WEIGHTS_FILE,
    CheckpointMismatch,
)
from dpo_service.state.store import CheckpointStore

pytestmark = pytest.mark.timeout(120)

PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
]


def _engine(tmp_path: Path, **overrides: Any) -> Engine:
    values: dict[str, Any] = {"checkpoint_dir": tmp_path, "keep_reference": True}
    values.update(overrides)
    engine = make_engine(small_settings(enable_grpc=False, **values))
    engine.load()
    return engine


def _stop(engine: Engine) -> None:
    asyncio.run(engine.stop())  # releases the directory lock


def _step(engine: Engine, request_id: str | None = None) -> LossResult:
    assert engine.bundle is not None
    body = LossRequest.model_validate({"pairs": PAIRS, "train": True, "request_id": request_id})
    result = engine._train_one(prepare(body, engine.bundle.tokenizer, engine.limits()))
    assert isinstance(result, LossResult), result
    return result


def _save(engine: Engine) -> Path:
    return engine._checkpoint_now().path


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    assert engine.bundle is not None
    return {k: v.clone() for k, v in engine.bundle.model.state_dict().items()}


def _assert_same_optimizer(a: Engine, b: Engine) -> None:
    assert a.state is not None and b.state is not None
    sa, sb = a.state.optimizer.state_dict(), b.state.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for pid, entries in sa["state"].items():
        assert entries.keys() == sb["state"][pid].keys()
        for name, value in entries.items():
            assert torch.equal(value, sb["state"][pid][name]), (pid, name)


@pytest.fixture
def trained(tmp_path: Path) -> Iterator[Engine]:
    """An engine with 3 steps applied (checkpoints at versions 1, 2 and 3)."""
    engine = _engine(tmp_path)
    for i in range(3):
        _step(engine, f"req-{i}")
        _save(engine)
    _stop(engine)
    yield engine


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    a = _engine(tmp_path)
    initial = _weights(a)
    for i in range(2):
        _step(a, f"req-{i}")
    path = _save(a)
    _stop(a)
    assert path.name == "ckpt-000000000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "state.json",
    ]  # safetensors and JSON only: nothing to unpickle
    assert (tmp_path / "idempotency.sqlite").is_file()  # the record, appended to (SQLite)
    assert (tmp_path / LATEST_FILE).read_text().strip() == path.name

    b = _engine(tmp_path)
    assert a.state is not None and b.state is not None and b.state.reference is not None
    assert b.version == 2
    live = _weights(b)
    for name, tensor in _weights(a).items():
        assert torch.equal(tensor, live[name]), name
    _assert_same_optimizer(a, b)
    assert b.state.completed == a.state.completed
    assert b.state.last_train_loss == a.state.last_train_loss
    # the frozen reference is the initial weights, not the resumed ones
    ref = b.state.reference.state_dict()  # type: ignore[attr-defined]
    assert all(torch.equal(ref[k], v) for k, v in initial.items())
    assert weights_digest(live) == json.loads((path / MANIFEST_FILE).read_text())["weights_sha256"]

    # both continue identically: the next step gives bit-identical weights
    _step(a)
    _step(b)
    after_a, after_b = _weights(a), _weights(b)
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)
    _stop(b)


def test_retry_after_restart_is_idempotent(trained: Engine, tmp_path: Path) -> None:
    b = _engine(tmp_path)
    before = _weights(b)
    again = _step(b, "req-1")  # answered from the restored record, nothing applied
    assert trained.state is not None
    assert again == trained.state.completed["req-1"]
    assert b.version == 3
    assert all(torch.equal(v, _weights(b)[k]) for k, v in before.items())
    _stop(b)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["flip_weights", "truncate_optimizer", "delete_weights", "edit_manifest", "empty_dir"],
)
def test_damaged_latest_is_skipped_for_the_previous_good_one(
    trained: Engine, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    latest = tmp_path / "ckpt-000000000003"
    if damage == "flip_weights":
        _flip_byte(latest / WEIGHTS_FILE, -5)  # in the tensor data, past the header
    elif damage == "truncate_optimizer":
        data = (latest / OPTIM_TENSORS_FILE).read_bytes()
        (latest / OPTIM_TENSORS_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "delete_weights":
        (latest / WEIGHTS_FILE).unlink()
    elif damage == "edit_manifest":
        _flip_byte(latest / WEIGHTS_FILE, -5)  # and "fix" the manifest to match
        manifest = json.loads((latest / MANIFEST_FILE).read_text())
        manifest["files"][WEIGHTS_FILE]["sha256"] = sha256_file(latest / WEIGHTS_FILE)
        (latest / MANIFEST_FILE).write_text(json.dumps(manifest))
    else:
        for f in latest.iterdir():
            f.unlink()
    caplog.set_level(logging.WARNING, logger="dpo_service.state.store")
    b = _engine(tmp_path)
    assert b.version == 2
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "ckpt-000000000003" in warning and "skipping checkpoint" in warning
    reason = {
        "flip_weights": "sha256 mismatch",
        "truncate_optimizer": "truncated",
        "delete_weights": "missing",
        "edit_manifest": "manifest.json: checksum mismatch",
        "empty_dir": "manifest.json: unreadable",
    }[damage]
    assert reason in warning
    assert trained.state is not None and b.state is not None
    assert list(b.state.completed) == ["req-0", "req-1"]
    # the next checkpoint at version 3 replaces the damaged directory
    _step(b)
    assert _save(b) == latest
    assert CheckpointStore(tmp_path).verify(latest).version == 3
    _stop(b)


def test_latest_pointing_to_a_missing_dir_falls_back(
    trained: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / LATEST_FILE).write_text("ckpt-000000000042\n")
    caplog.set_level(logging.WARNING, logger="dpo_service.state.store")
    b = _engine(tmp_path)
    assert b.version == 3
    assert "ckpt-000000000042, which does not exist" in caplog.text
    _stop(b)
    (tmp_path / LATEST_FILE).write_text("../../etc/passwd\n")
    b = _engine(tmp_path)
    assert b.version == 3
    _stop(b)


def test_a_verified_checkpoint_newer_than_latest_is_resumed(
    trained: Engine, tmp_path: Path
) -> None:
    """The directory rename is the commit point: a complete, verified directory that LATEST
    does not name yet (crash between the rename and the pointer) is resumed, and nothing newer
    than the saved version is ever pruned. Interrupted temp directories are ignored and
    cleaned up."""
    (tmp_path / LATEST_FILE).write_text("ckpt-000000000002\n")
    (tmp_path / ".tmp-ckpt-000000000004-deadbeef").mkdir()
    (tmp_path / ".tmp-ckpt-000000000004-deadbeef" / WEIGHTS_FILE).write_bytes(b"partial")
    b = _engine(tmp_path)
    assert b.version == 3
    _step(b)
    _step(b)
    _save(b)
    _stop(b)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [
        "ckpt-000000000002",
        "ckpt-000000000003",
        "ckpt-000000000005",
    ]  # keep 3; the temp directory is gone
    assert not list(tmp_path.glob(".tmp-ckpt-*"))
    assert (tmp_path / LATEST_FILE).read_text().strip() == "ckpt-000000000005"


def test_keep_k_prunes_old_checkpoints(tmp_path: Path) -> None:
    engine = _engine(tmp_path, checkpoint_keep=2)
    for _ in range(4):
        _step(engine)
        _save(engine)
    assert _save(engine).name == "ckpt-000000000004"  # same version: no new write
    _stop(engine)
    names = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert names == ["ckpt-000000000003", "ckpt-000000000004"]
    assert (tmp_path / LATEST_FILE).read_text().strip() == "ckpt-000000000004"
    assert engine.events.snapshot()["checkpoints"] == 4


def test_checkpoint_every_n_steps(tmp_path: Path) -> None:
    engine = _engine(tmp_path, checkpoint_every=2)
    for _ in range(5):
        _step(engine)
    _stop(engine)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [
        "ckpt-000000000002",
        "ckpt-000000000004",
    ]


def test_checkpoint_for_another_model_is_refused(trained: Engine, tmp_path: Path) -> None:
    with pytest.raises(CheckpointMismatch, match=r"d_model: checkpoint 64 != loaded 32"):
        _engine(tmp_path, builtin_d_model=32)
    # a different seed is not a different architecture: resumes
    b = _engine(tmp_path, seed=7)
    assert b.version == 3
    assert b.bundle is not None
    store = CheckpointStore(tmp_path)
    other_tokenizer = {**tokenizer_identity(b.bundle.tokenizer), "name": "gpt2"}
    _stop(b)
    with pytest.raises(CheckpointMismatch, match="tokenizer name: checkpoint 'byte-utf8-v1'"):
        store.load_latest(model_config=model_config_of(b.bundle.model), tokenizer=other_tokenizer)


def test_a_second_server_cannot_share_the_directory(tmp_path: Path) -> None:
    a = _engine(tmp_path)
    with pytest.raises(ValueError, match="in use by another server process"):
        _engine(tmp_path)
    _stop(a)
    _stop(_engine(tmp_path))  # released on stop


def test_describe_lists_versions_and_checksums(trained: Engine, tmp_path: Path) -> None:
    _flip_byte(tmp_path / "ckpt-000000000002" / WEIGHTS_FILE, -3)
    listing = CheckpointStore(tmp_path).describe()
    assert listing["latest"] == "ckpt-000000000003"
    by_version = {c["version"]: c for c in listing["checkpoints"]}
    assert by_version[3]["valid"] and len(by_version[3]["files"][WEIGHTS_FILE]) == 64
    assert not by_version[2]["valid"] and "sha256 mismatch" in by_version[2]["reason"]
