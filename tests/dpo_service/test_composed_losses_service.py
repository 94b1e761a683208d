"""Composed losses (TRL's ``loss_type`` list with ``loss_weights``) through the real server.

The terms and the weighted total equal a reference computation from the response's own
log-probs; a train step steps on the total; HTTP and gRPC give the same numbers; a single
``loss_type`` string answers as before; bad lists are refused on both protocols, naming the
field, changing nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from conftest import API_KEY, ServerThread, running_server
from dpo_service.api.grpc.convert import request_from_dict, response_from_proto
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.client import DpoClient

AUTH = {"Authorization": f"Bearer {API_KEY}"}
METADATA = (("authorization", f"Bearer {API_KEY}"),)
PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five, probably"},
    {"prompt": "Say hi", "chosen": "Hello there!", "rejected": "no"},
    {"prompt": "Colour of sky", "chosen": " blue", "rejected": " green-ish"},
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server() as srv:
        yield srv


def _http(srv: ServerThread, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=srv.http_url, timeout=60) as c:
        return c.post("/dpo/loss", json=body, headers=AUTH)


def _grpc(srv: ServerThread, message: pb.ComputeLossRequest) -> pb.ComputeLossResponse:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        return pb_grpc.DpoServiceStub(channel).ComputeLoss(message, metadata=METADATA, timeout=60)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_terms_and_total_equal_a_reference_computation(server: ServerThread) -> None:
    """sigmoid (no reference: −log σ(β(π_c − π_r))) and sft (−π_c / n_c), per pair from the
    response's log-probs; ``loss`` = Σ w_k · mean(term_k)."""
    beta, weights = 0.3, [1.0, 0.25]
    r = _http(server, {"pairs": PAIRS, "beta": beta, "loss_type": ["sigmoid", "sft"],
                       "loss_weights": weights})  # fmt: skip
    assert r.status_code == 200, r.text
    d = r.json()
    c, rj, n = d["chosen_logps"], d["rejected_logps"], d["chosen_tokens"]
    sigmoid = [-_log_sigmoid(beta * (a - b)) for a, b in zip(c, rj, strict=True)]
    sft = [-a / k for a, k in zip(c, n, strict=True)]
    assert d["loss_terms"]["sigmoid"] == pytest.approx(sum(sigmoid) / 3, rel=1e-5)
    assert d["loss_terms"]["sft"] == pytest.approx(sum(sft) / 3, rel=1e-5)
    assert list(d["loss_terms"]) == ["sigmoid", "sft"]  # the request's order
    assert d["loss_weights"] == {"sigmoid": 1.0, "sft": 0.25}
    per_pair = [s + 0.25 * f for s, f in zip(sigmoid, sft, strict=True)]
    assert d["losses"] == pytest.approx(per_pair, rel=1e-5)
    assert d["loss"] == pytest.approx(sum(per_pair) / 3, rel=1e-5)
    assert d["metrics"]["loss/sft"] == d["loss_terms"]["sft"]
    assert d["loss_type"] == "sigmoid"  # the first preference term: its rewards are reported


def test_sft_alone_and_a_weight_of_zero(server: ServerThread) -> None:
    only = _http(server, {"pairs": PAIRS, "loss_type": ["sft"]}).json()
    assert only["loss"] == pytest.approx(only["loss_terms"]["sft"], rel=1e-6)
    zero = _http(server, {"pairs": PAIRS, "loss_type": ["hinge", "sft"],
                          "loss_weights": [0.0, 2.0]}).json()  # fmt: skip
    assert zero["loss"] == pytest.approx(2 * zero["loss_terms"]["sft"], rel=1e-6)
    assert zero["loss_terms"]["hinge"] > 0  # reported, not added


def test_a_single_loss_type_answers_as_before(server: ServerThread) -> None:
    single = _http(server, {"pairs": PAIRS, "loss_type": "ipo"}).json()
    assert single["loss_terms"] is None and single["loss_weights"] is None
    assert "loss/ipo" not in single["metrics"]
    as_list = _http(server, {"pairs": PAIRS, "loss_type": ["ipo"]}).json()
    assert as_list["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert as_list["losses"] == pytest.approx(single["losses"], rel=1e-6)


def test_same_numbers_over_grpc_and_the_client(server: ServerThread) -> None:
    body = {"pairs": PAIRS, "beta": 0.2, "loss_type": ["robust", "sft"],
            "loss_weights": [0.5, 1.5], "label_smoothing": 0.1}  # fmt: skip
    over_http = _http(server, body).json()
    message = request_from_dict(body)
    assert list(message.loss_terms) == [pb.LOSS_TERM_ROBUST, pb.LOSS_TERM_SFT]
    over_grpc = response_from_proto(_grpc(server, message))
    for key in ("loss", "losses", "loss_terms", "loss_weights", "rewards_chosen", "metrics"):
        assert over_grpc[key] == over_http[key], key
    client = DpoClient.grpc(server.grpc_target, API_KEY)
    out = client.compute_loss(PAIRS, beta=0.2, loss_type=["robust", "sft"],
                              loss_weights=[0.5, 1.5], label_smoothing=0.1)  # fmt: skip
    assert out.loss_terms == over_http["loss_terms"] and out.loss == over_http["loss"]


def test_a_train_step_steps_on_the_total(server: ServerThread) -> None:
    body = {"pairs": PAIRS, "beta": 0.5, "loss_type": ["sigmoid", "sft"],
            "loss_weights": [1.0, 0.5]}  # fmt: skip
    before = _http(server, body).json()
    trained = _http(server, {**body, "train": True}).json()
    assert trained["trained"] is True
    assert trained["new_model_version"] == before["model_version"] + 1
    assert trained["loss"] == pytest.approx(before["loss"], rel=1e-4)  # computed before
    assert trained["loss_terms"] == pytest.approx(before["loss_terms"], rel=1e-4)
    after = _http(server, body).json()
    assert after["loss"] < before["loss"]  # one step down the weighted total
    # the sft term pulled the chosen responses up
    assert after["loss_terms"]["sft"] < before["loss_terms"]["sft"]


# ------------------------------------------------------------------ hostile lists, both protocols
BAD_HTTP: list[tuple[dict[str, Any], str]] = [
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
    ({"loss_type": ["sigmoid", "nope"]}, "loss_type[1]"),
    ({"loss_type": ["sft", "sft"]}, "loss_type[1]"),
    ({"loss_type": []}, "loss_type"),
    ({"loss_type": ["sigmoid", 3]}, "loss_type[1]"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]}, "loss_weights[1]"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.0, 0.0]}, "loss_weights"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, "x"]}, "loss_weights[1]"),
    ({"loss_type": "sigmoid", "loss_weights": [1.0]}, "loss_weights"),
    ({"loss_type": ["robust", "sft"], "label_smoothing": 0.6}, "label_smoothing"),
    ({"loss_type": ["sigmoid"] * 17}, "loss_type"),
]


@pytest.mark.parametrize(("extra", "field"), BAD_HTTP)
def test_bad_lists_over_http(server: ServerThread, extra: dict[str, Any], field: str) -> None:
    version = server.version
    r = _http(server, {"pairs": PAIRS, "train": True, **extra})
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.json()
    assert server.version == version


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_weights_over_http(server: ServerThread, literal: str) -> None:
    body = (
        '{"pairs": [{"prompt": "a", "chosen": "b", "rejected": "c"}], "train": true, '
        f'"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, {literal}]}}'
    )
    version = server.version
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        r = c.post("/dpo/loss", content=body,
                   headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 422, r.text
    assert "loss_weights[1]" in [e["field"] for e in r.json()["errors"]]
    assert server.version == version


def _message(**fields: Any) -> pb.ComputeLossRequest:
    message = request_from_dict({"pairs": PAIRS, "train": True})
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(message, key).extend(value)
        else:
            setattr(message, key, value)
    return message


BAD_GRPC: list[tuple[dict[str, Any], str]] = [
    ({"loss_terms": [pb.LOSS_TERM_SIGMOID, pb.LOSS_TERM_SFT], "loss_weights": [1.0]}, "loss_weights"),
    ({"loss_terms": [pb.LOSS_TERM_SIGMOID], "loss_weights": [math.nan]}, "loss_weights[0]"),
    ({"loss_terms": [pb.LOSS_TERM_SIGMOID], "loss_weights": [math.inf]}, "loss_weights[0]"),
    ({"loss_terms": [pb.LOSS_TERM_SIGMOID, 99]}, "loss_type[1]"),
    ({"loss_terms": [pb.LOSS_TERM_UNSPECIFIED]}, "loss_type[0]"),
    ({"loss_terms": [pb.LOSS_TERM_SFT, pb.LOSS_TERM_SFT]}, "loss_type[1]"),
    ({"loss_terms": [pb.LOSS_TERM_SFT], "loss_type": pb.LOSS_TYPE_HINGE}, "loss_type"),
    ({"loss_weights": [1.0]}, "loss_weights"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "field"), BAD_GRPC)
def test_bad_lists_over_grpc(server: ServerThread, fields: dict[str, Any], field: str) -> None:
    version = server.version
    with pytest.raises(grpc.RpcError) as info:
        _grpc(server, _message(**fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(field), info.value.details()
    assert server.version == version


def test_a_request_id_covers_the_terms_and_weights(server: ServerThread) -> None:
    """A retried train request replays its first result; the same request_id with other
    weights is a 409, not the old answer."""
    body = {"pairs": PAIRS, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5],
            "train": True, "request_id": "composed-once"}  # fmt: skip
    first = _http(server, body)
    version = server.version
    again = _http(server, body)
    assert again.status_code == 200 and again.json() == first.json()
    other = _http(server, {**body, "loss_weights": [1.0, 0.25]})
    assert other.status_code == 409, other.text
    flag = _http(server, {**body, "return_token_logps": True})
    assert flag.status_code == 409, flag.text
    assert server.version == version


def test_remote_trainer_sends_a_composed_loss(server: ServerThread, tmp_path: Any) -> None:
    """``train-remote --loss-type sigmoid,sft --loss-weights 1,0.5``: every step's loss is
    the weighted total (the same as a loss-only request of that batch at that version)."""
    from dpo_service.client.remote_trainer import loss_options, main, train

    assert loss_options("ipo") == {"loss_type": "ipo"}
    options = loss_options("sigmoid, sft", "1,0.5")
    assert options == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    client = DpoClient.http(server.http_url, API_KEY)
    expected = client.compute_loss(PAIRS, beta=0.1, **options)
    history = train(
        client, PAIRS, steps=1, batch_size=3, beta=0.1, progress=False, loss_fields=options
    )
    assert history.train[0].loss == pytest.approx(expected.loss, rel=1e-4)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    bad = ["--target", server.http_url, "--data", str(data), "--loss-type", "sigmoid,sft",
           "--loss-weights", "1,x", "--no-progress"]  # fmt: skip
    assert main(bad) == 2  # refused before anything is sent
