"""Engine results and their persisted form (``LossResult.to_json``, versioned).

The idempotency record (``idempotency.sqlite``; format-1 checkpoints: ``idempotency.json``)
is JSON of engine results, not of the wire schema, so a change of the HTTP/gRPC response
cannot break a resume. Entries this version cannot read
(written before the schema existed, a future schema, or malformed) are skipped with a log line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from ckpt_helpers import as_format_1
from conftest import small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.engine.checkpointing import restore_idempotency
from dpo_service.engine.preparation import prepare
from dpo_service.engine.results import RESULT_SCHEMA, LossResult, UnknownResultSchema
from dpo_service.engine.sessions.service import session_fields
from dpo_service.schemas import LossRequest, LossResponse
from dpo_service.settings import Settings
from dpo_service.state.record import IdempotencyRecord

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
    """As the adapters build it: the result's fields plus its session's (``result.extra``)."""
    for result in (_result(), replace(_result(), extra={"session": "s-" + "0" * 16})):
        wire = {**result.as_dict(), **session_fields(result)}
        response = LossResponse.model_validate(wire)
        assert response.model_dump(mode="json") == {**wire, "loss_type": "sigmoid"}
        assert response.session == result.extra.get("session")


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


def _trained_checkpoint(tmp_path: Path) -> tuple[Settings, LossResult, Path]:
    """A checkpoint at version 1 whose step has request_id "new"."""
    settings = small_settings(enable_grpc=False, checkpoint_dir=tmp_path)
    engine = make_engine(settings)
    engine.load()
    assert engine.bundle is not None and engine.state is not None
    body = LossRequest.model_validate({"pairs": PAIRS, "train": True, "request_id": "new"})
    result = engine._train_one(prepare(body, engine.bundle.tokenizer, engine.limits()))
    assert isinstance(result, LossResult)
    path = engine._checkpoint_now().path
    asyncio.run(engine.stop())
    return settings, result, path


def _resumed_ids(settings: Settings) -> list[str]:
    resumed = make_engine(settings)
    resumed.load()
    try:
        assert resumed.version == 1
        assert resumed.state is not None
        return list(resumed.state.completed)
    finally:
        asyncio.run(resumed.stop())


def test_a_format_1_checkpoint_with_an_older_entry_still_resumes(tmp_path: Path) -> None:
    """Real files: a format-1 checkpoint (its record in its own idempotency.json) holding one
    entry in the pre-schema (wire) format and one current entry resumes; the old id is
    skipped, the current one kept, and imported into the record (idempotency.sqlite), so it
    survives the next restart too."""
    settings, result, path = _trained_checkpoint(tmp_path)
    old = LossResponse.model_validate(_result("old").as_dict()).model_dump(mode="json")
    as_format_1(path, [("old", old), ("new", result.to_json())])
    assert not (tmp_path / "idempotency.sqlite").exists()
    assert _resumed_ids(settings) == ["new"]
    assert _resumed_ids(settings) == ["new"]  # now from the record


def test_an_unreadable_entry_of_the_record_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SQLite record: a row this version cannot read is skipped with a log line; the
    resume goes on."""
    settings, _, _ = _trained_checkpoint(tmp_path)
    old = LossResponse.model_validate(_result("old").as_dict()).model_dump(mode="json")
    record = IdempotencyRecord(tmp_path / "idempotency.sqlite", 16)
    record.append([("old", 1, old)], after=1)
    record.close()
    caplog.set_level(logging.WARNING, logger="dpo_service.engine.checkpointing")
    assert _resumed_ids(settings) == ["new"]
    assert "'old' not restored" in caplog.text
