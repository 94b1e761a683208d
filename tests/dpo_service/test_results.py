"""Engine results and their persisted form (``LossResult.to_json``, versioned).

A checkpoint's idempotency record is JSON of engine results, not of the wire schema, so a
change of the HTTP/gRPC response cannot break a resume. Entries this version cannot read
(written before the schema existed, a future schema, or malformed) are skipped with a log line.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from conftest import small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.engine.checkpointing import restore_idempotency, snapshot_state
from dpo_service.engine.preparation import prepare
from dpo_service.engine.results import RESULT_SCHEMA, LossResult, UnknownResultSchema
from dpo_service.schemas import LossRequest, LossResponse
from dpo_service.state.store import CheckpointStore

PAIRS = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"}]


def _result(request_id: str = "r-1", **changes: object) -> LossResult:
    values: dict[str, object] = dict(
        loss=0.7, losses=[0.7], chosen_logps=[-3.0], rejected_logps=[-4.0],
        reference_chosen_logps=None, reference_rejected_logps=None, rewards_chosen=[-0.3],
        rewards_rejected=[-0.4], margins=[0.1], accuracy=1.0, chosen_tokens=[2],
        rejected_tokens=[5], num_tokens=12, metrics={"rewards/margins": 0.1},
        loss_type="sigmoid", beta=0.1, model_version=3, request_id=request_id,
    )  # fmt: skip
    values.update(changes)
    return LossResult(**values)  # type: ignore[arg-type]


def test_json_round_trip_and_schema_tag() -> None:
    result = _result().trained_as(grad_norm=1.5, new_version=4)
    data = result.to_json()
    assert data["schema"] == RESULT_SCHEMA
    assert LossResult.from_json(data) == result


def test_the_wire_response_is_built_from_the_result_field_for_field() -> None:
    result = _result()
    response = LossResponse.model_validate(result.as_dict())
    assert response.model_dump(mode="json") == {**result.as_dict(), "loss_type": "sigmoid"}


def test_unknown_keys_of_the_same_schema_are_ignored() -> None:
    """A newer writer of the same schema may add fields; they are dropped, the rest loads."""
    data = {**_result().to_json(), "added_later": [1, 2]}
    assert LossResult.from_json(data) == _result()


@pytest.mark.parametrize(
    "entry",
    [
        {k: v for k, v in _result().to_json().items() if k != "schema"},  # before the schema
        {**_result().to_json(), "schema": RESULT_SCHEMA + 1},  # a future schema
        ["not", "an", "object"],
    ],
    ids=["no-schema", "future-schema", "not-an-object"],
)
def test_unreadable_entries_raise_unknown_schema(entry: object) -> None:
    with pytest.raises(UnknownResultSchema):
        LossResult.from_json(entry)


def test_malformed_entry_of_the_right_schema_is_an_error() -> None:
    data = _result().to_json()
    del data["loss"]
    with pytest.raises(TypeError):
        LossResult.from_json(data)


def test_restore_skips_unreadable_entries_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = LossResponse.model_validate(_result("old").as_dict()).model_dump(mode="json")
    entries = [("old", old), ("good", _result("good").to_json()), ("bad", {"schema": 1})]
    caplog.set_level(logging.WARNING, logger="dpo_service.engine.checkpointing")
    memory = restore_idempotency(entries, "ckpt-x")
    assert list(memory) == ["good"]
    assert memory["good"] == _result("good")
    text = caplog.text
    assert "'old' not restored" in text and "'bad' not restored" in text
    assert "2 remembered train request ids were skipped" in text


def test_a_checkpoint_with_an_older_entry_still_resumes(tmp_path: Path) -> None:
    """Real files: a checkpoint whose idempotency record holds one entry in the pre-schema
    (wire) format and one current entry resumes; the old id is skipped, the current one kept."""
    settings = small_settings(enable_grpc=False, checkpoint_dir=tmp_path)
    engine = make_engine(settings)
    engine.load()
    assert engine.bundle is not None and engine.state is not None
    body = LossRequest.model_validate({"pairs": PAIRS, "train": True, "request_id": "new"})
    engine._train_one(prepare(body, engine.bundle.tokenizer, engine.limits()))
    snap = snapshot_state(engine.state)
    old = LossResponse.model_validate(_result("old").as_dict()).model_dump(mode="json")
    snap.idempotency.insert(0, ("old", old))
    asyncio.run(engine.stop())
    store = CheckpointStore(tmp_path)
    store.save(snap)
    resumed = make_engine(settings)
    resumed.load()
    try:
        assert resumed.version == 1
        assert resumed.state is not None and list(resumed.state.completed) == ["new"]
    finally:
        asyncio.run(resumed.stop())
