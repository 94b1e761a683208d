"""The remote trainer's datasets: JSONL and Parquet in TRL's standard, conversational and
implicit-prompt forms, the request bodies they become, held-out evaluation, and an end-to-end
run against a real server on loopback."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import API_KEY, running_server
from dpo_service.client import DpoClient, DpoClientError, ErrorCode, normalize_pair
from dpo_service.client import remote_trainer as rt
from dpo_service.client.preference_data import (
    DatasetError,
    PreferenceExample,
    load_examples,
    split_implicit_prompt,
)
from dpo_service.client.transports import GrpcTransport

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "examples" / "data" / "preferences.jsonl"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}

# One row per form, with what it parses to. Extra columns (``id``) are ignored.
STANDARD = {"id": 1, "prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
CONVERSATIONAL = {
    "prompt": [SYSTEM, user("2+2?")],
    "chosen": [assistant("4")],
    "rejected": [assistant("5")],
}
IMPLICIT = {
    "chosen": [user("2+2?"), assistant("4")],
    "rejected": [user("2+2?"), assistant("5")],
}
IMPLICIT_TEXT = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
FORMS = {
    "standard": (STANDARD, PreferenceExample("standard", " 4", " 5", "Q: 2+2?")),
    "conversational": (
        CONVERSATIONAL,
        PreferenceExample(
            "conversational", [assistant("4")], [assistant("5")], [SYSTEM, user("2+2?")]
        ),
    ),
    "implicit": (IMPLICIT, PreferenceExample("implicit", IMPLICIT["chosen"], IMPLICIT["rejected"])),
    "implicit_text": (
        IMPLICIT_TEXT,
        PreferenceExample("implicit", " blue.", " green.", "The sky is"),
    ),
}


def write_jsonl(path: Path, rows: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


WRITERS: dict[str, Callable[[Path, Sequence[dict[str, Any]]], Path]] = {
    "jsonl": write_jsonl,
    "parquet": write_parquet,
}


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_reads_from_jsonl_and_parquet(tmp_path: Path, fmt: str, form: str) -> None:
    row, expected = FORMS[form]
    path = WRITERS[fmt](tmp_path / f"data.{fmt}", [row, row])
    examples = load_examples(path)
    assert examples == [expected, expected]


def test_parquet_schema_is_the_conversational_one(tmp_path: Path) -> None:
    """What TRL's Hub datasets hold: list<struct<role, content>> columns."""
    path = write_parquet(tmp_path / "c.parquet", [CONVERSATIONAL])
    schema = pq.read_schema(path)
    assert pa.types.is_list(schema.field("prompt").type)
    assert pa.types.is_struct(schema.field("prompt").type.value_type)
    assert load_examples(path)[0].form == "conversational"


def test_parquet_null_struct_fields_are_dropped_but_real_extra_fields_refused(
    tmp_path: Path,
) -> None:
    """A struct column unifies message keys across rows: a key one message has is null in the
    others (dropped), a real value under an unknown key is refused."""
    named = {**CONVERSATIONAL, "prompt": [{**user("2+2?"), "name": None}]}
    ok = write_parquet(tmp_path / "ok.parquet", [named])
    assert load_examples(ok)[0].prompt == [user("2+2?")]
    bad = {**CONVERSATIONAL, "prompt": [{**user("2+2?"), "name": "ann"}]}
    with pytest.raises(DatasetError, match=r"row 0: prompt\[0\]\.name: unknown message field"):
        load_examples(write_parquet(tmp_path / "bad.parquet", [bad]))


def test_to_pair_shapes() -> None:
    assert FORMS["standard"][1].to_pair() == {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
    assert FORMS["implicit"][1].to_pair() == {
        "chosen": IMPLICIT["chosen"],
        "rejected": IMPLICIT["rejected"],
    }


def test_implicit_text_prompt_split_follows_trl() -> None:
    """Longest common prefix, less the trailing space, which starts both responses."""
    assert split_implicit_prompt("The sky is blue.", "The sky is green.") == (
        "The sky is", " blue.", " green.",
    )  # fmt: skip
    assert split_implicit_prompt("ab", "cd") == ("", "ab", "cd")  # no shared prompt: empty
    assert split_implicit_prompt("Q:4", "Q:5") == ("Q:", "4", "5")


MALFORMED: list[tuple[object, str]] = [
    ({"prompt": "p", "chosen": "c"}, r"rejected: missing"),
    ({"prompt": "p", "chosen": 4, "rejected": "r"}, r"chosen: expected a string, got int"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, r"chosen: the response is empty"),
    (
        {"prompt": 3, "chosen": "c", "rejected": "r"},
        r"prompt: expected a list of messages, got int",
    ),
    ({"prompt": [], "chosen": "c", "rejected": "r"}, r"prompt: the message list is empty"),
    (
        {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "c", "rejected": "r"},
        r"prompt\[0\]\.role: must be one of system, user, assistant, tool, got 'robot'",
    ),
    (
        {**CONVERSATIONAL, "chosen": [{"role": "assistant", "content": 4}]},
        r"chosen\[0\]\.content: must be a string, got int",
    ),
    (
        {**CONVERSATIONAL, "rejected": [assistant("5"), user("again")]},
        r"rejected\[1\]\.role: a response holds assistant messages, got 'user'",
    ),
    (
        {**CONVERSATIONAL, "chosen": [assistant("4"), "oops"]},
        r"chosen\[1\]: a message must be an object",
    ),
    (
        {"prompt": "Q", "chosen": [assistant("4")], "rejected": [assistant("5")]},
        r"prompt: a string prompt needs string responses",
    ),
    (
        {"chosen": [user("a"), assistant("4")], "rejected": [user("b"), assistant("5")]},
        r"chosen: without a prompt, chosen and rejected must share their first message",
    ),
    (
        {"chosen": [user("a"), assistant("4")], "rejected": [user("a")]},
        r"rejected: nothing follows the prompt shared",
    ),
    (
        {"chosen": [user("a"), user("b")], "rejected": [user("a"), assistant("5")]},
        r"chosen\[1\]\.role: after the shared prompt come assistant messages, got 'user'",
    ),
    (
        {"chosen": [user("a"), assistant("4")], "rejected": "5"},
        r"rejected: expected a list of messages, got str",
    ),
    ({"chosen": "same", "rejected": "same"}, r"chosen: nothing follows the prompt shared"),
    (["p", "c", "r"], r"row: expected an object, got list"),
]


@pytest.mark.parametrize(("row", "match"), MALFORMED)
def test_malformed_jsonl_row_names_line_and_field(tmp_path: Path, row: object, match: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [STANDARD, row])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}:2: {match}"):
        load_examples(path)


def test_malformed_parquet_row_names_row_and_field(tmp_path: Path) -> None:
    rows = [STANDARD, {**STANDARD, "chosen": ""}, STANDARD]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(path))}: row 1: chosen: the response is empty"
    ):
        load_examples(path)


def test_unreadable_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text(json.dumps(STANDARD) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(bad_json))}:3: not valid JSON"):
        load_examples(bad_json)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no preference pairs"):
        load_examples(empty)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        load_examples(junk)
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"unknown dataset format '\.csv': use \.jsonl"):
        load_examples(csv)


# ----------------------------------------------------------------------------- request bodies


def test_build_request_passes_message_lists_through() -> None:
    client = DpoClient(FakeTransport())
    body = client.build_request(
        [CONVERSATIONAL, IMPLICIT, (CONVERSATIONAL["prompt"], "4", [assistant("5")])], beta=0.2
    )
    assert body["pairs"] == [
        CONVERSATIONAL,
        IMPLICIT,
        {"prompt": [SYSTEM, user("2+2?")], "chosen": "4", "rejected": [assistant("5")]},
    ]
    assert body["beta"] == 0.2 and body["train"] is False and "request_id" not in body


@pytest.mark.parametrize(
    ("pair", "field"),
    [
        ({**CONVERSATIONAL, "chosen": [user("4")]}, "pairs[0].chosen[0].role"),
        (
            {**CONVERSATIONAL, "prompt": [{"role": "user", "content": b"x"}]},
            "pairs[0].prompt[0].content",
        ),
        ({"chosen": [user("a"), assistant("4")]}, "pairs[0].rejected"),
        (("Q", [assistant("4")], [assistant("5")]), "pairs[0].prompt"),
        ((CONVERSATIONAL["prompt"], "", "x"), "pairs[0].chosen"),
    ],
)
def test_normalize_pair_refuses_bad_messages(pair: object, field: str) -> None:
    with pytest.raises(DpoClientError) as info:
        normalize_pair(pair, 0)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert info.value.errors[0][0] == field
    assert str(info.value).startswith(f"invalid_argument: {field}: ")


def test_grpc_transport_sends_message_pairs_as_conversations() -> None:
    """The gRPC contract carries message-list pairs (``PreferencePair.conversation``)."""
    msg = GrpcTransport.to_proto({"pairs": [CONVERSATIONAL]})
    assert msg.pairs[0].WhichOneof("input") == "conversation"
    assert [m.content for m in msg.pairs[0].conversation.prompt] == [
        m["content"] for m in CONVERSATIONAL["prompt"]
    ]


class FakeTransport:
    """Records request bodies and answers like the service would (a fixed loss per pair).

    Used where the bodies the trainer builds are what matter (the real service answers
    message-list pairs too: tests/dpo_service/test_conversations.py).
    """

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.version = 0

    def compute_loss(self, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        self.bodies.append(json.loads(json.dumps(body)))  # what goes over the wire
        n = len(body["pairs"])
        version = self.version
        if body["train"]:
            self.version += 1
        return {
            "loss": 0.5, "losses": [0.5] * n, "chosen_logps": [-1.0] * n,
            "rejected_logps": [-2.0] * n, "reference_chosen_logps": None,
            "reference_rejected_logps": None, "rewards_chosen": [-0.1] * n,
            "rewards_rejected": [-0.2] * n, "margins": [0.1] * n, "accuracy": 1.0,
            "chosen_tokens": [1] * n, "rejected_tokens": [1] * n, "num_tokens": 3 * n,
            "metrics": {}, "loss_type": "sigmoid", "beta": body["beta"],
            "model_version": version, "trained": body["train"],
            "new_model_version": self.version if body["train"] else None,
        }  # fmt: skip

    def model_info(self, timeout: float | None) -> dict[str, Any]:
        raise NotImplementedError

    def checkpoint(self, timeout: float | None) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_trainer_sends_conversational_rows_as_they_are(tmp_path: Path) -> None:
    """Conversational and implicit rows become request pairs unchanged; the held-out set goes in
    loss-only requests (no request id, train false) of --eval-batch-size pairs, evaluated
    before the first step, every N steps and after the last."""
    train_rows = [CONVERSATIONAL, IMPLICIT, CONVERSATIONAL, IMPLICIT]
    held_out = [IMPLICIT] * 3
    pairs = rt.load_pairs(write_parquet(tmp_path / "train.parquet", train_rows))
    eval_pairs = rt.load_pairs(write_jsonl(tmp_path / "eval.jsonl", held_out))
    fake = FakeTransport()
    history = rt.train(
        DpoClient(fake), pairs, steps=5, batch_size=2, beta=0.3, progress=False,
        run_id="r", eval_plan=rt.EvalPlan(eval_pairs, every=2, batch_size=2),
    )  # fmt: skip
    train_bodies = [b for b in fake.bodies if b["train"]]
    eval_bodies = [b for b in fake.bodies if not b["train"]]
    assert [b["request_id"] for b in train_bodies] == [f"r-{i}" for i in range(5)]
    for body in train_bodies:
        assert all(p in (CONVERSATIONAL, IMPLICIT) for p in body["pairs"]) and body["beta"] == 0.3
    assert len(eval_bodies) == 4 * 2  # evaluations at 0, 2, 4, 5; 3 pairs in batches of 2
    assert all("request_id" not in b for b in eval_bodies)
    assert [b["pairs"] for b in eval_bodies[:2]] == [[IMPLICIT, IMPLICIT], [IMPLICIT]]
    assert [e.step for e in history.eval] == [0, 2, 4, 5]
    assert [e.model_version for e in history.eval] == [0, 2, 4, 5]
    assert all(e.pairs == 3 and e.loss == 0.5 and math.isclose(e.margin, 0.1) for e in history.eval)
    assert [r.model_version for r in history.train] == [1, 2, 3, 4, 5]


def test_cli_reports_a_bad_dataset_without_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loading comes first: a bad row is a one-line error (exit 2) and nothing is sent (the
    target is a closed port)."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [STANDARD, {"prompt": "p", "chosen": "c"}])
    target = "http://127.0.0.1:9"
    assert rt.main(["--target", target, "--data", str(bad), "--no-progress"]) == 2
    assert f"error: {bad}:2: rejected: missing" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [STANDARD])
    argv = ["--target", target, "--data", str(good), "--eval-data", str(bad), "--no-progress"]
    assert rt.main(argv) == 2
    assert rt.main(["--target", target, "--data", str(good), "--eval-every", "0"]) == 2
    assert "--eval-every must be >= 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_remote_with_held_out_set_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Standard-form JSONL for training, a Parquet held-out set: 6 steps, evaluated at steps
    0, 3 and 6 with loss-only requests (which never move the model), recorded in the history
    JSON at the versions they saw, and drawn into the plot."""
    rows = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    data = write_jsonl(tmp_path / "train.jsonl", rows[:40])
    held_out = write_parquet(tmp_path / "held_out.parquet", rows[180:])
    plot = tmp_path / "out" / "run.png"
    monkeypatch.setenv("DPO_TRAINER_API_KEY", API_KEY)
    with running_server(lr=2e-3) as srv:
        start = srv.version
        argv = [
            "--target", f"grpc://{srv.grpc_target}", "--data", str(data),
            "--eval-data", str(held_out), "--eval-every", "3", "--eval-batch-size", "8",
            "--steps", "6", "--batch-size", "4", "--plot", str(plot), "--no-progress",
            "--no-checkpoint",
        ]  # fmt: skip
        assert rt.main(argv) == 0
        assert srv.version == start + 6  # evaluation trained nothing
        with DpoClient.grpc(srv.grpc_target) as client:  # held-out loss at the final version
            final = rt.evaluate(client, rt.load_pairs(held_out), step=6, batch_size=8, beta=0.1)
    history = json.loads(plot.with_suffix(".json").read_text(encoding="utf-8"))
    assert [r["model_version"] for r in history["train"]] == list(range(start + 1, start + 7))
    evals = history["eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert [e["model_version"] for e in evals] == [start, start + 3, start + 6]
    assert all(e["pairs"] == 20 and math.isfinite(e["loss"]) for e in evals)
    assert evals[-1]["loss"] == pytest.approx(final.loss, rel=1e-5)
    assert evals[-1]["accuracy"] == pytest.approx(final.accuracy)
    assert evals[0]["loss"] != evals[-1]["loss"]  # the model moved between them
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
