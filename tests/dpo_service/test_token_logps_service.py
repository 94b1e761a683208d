"""Per-token log-probs on request (``return_token_logps``) through the real server.

Per-token values sum to the sequence log-probs and score exactly the response ids; they are
off by default; HTTP and gRPC give the same numbers; coalesced batches and train steps keep
each request's own rows; the response size stays bounded by the gRPC message limit (checked
before anything runs); a non-boolean flag is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest

from conftest import API_KEY, ServerThread, running_server
from dpo_service.api.grpc.convert import request_from_dict, response_from_proto, response_to_proto
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.client import DpoClient
from dpo_service.engine.response_size import token_logps_response_bytes
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens
from modern_llm.tokenizer import ByteTokenizer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
METADATA = (("authorization", f"Bearer {API_KEY}"),)
PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five, probably"},
    {"prompt": "Say hi", "chosen": "Hello there!", "rejected": "no"},
    {"prompt_ids": [1, 70, 71], "chosen_ids": [80, 81, 82, 83], "rejected_ids": [90]},
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(keep_reference=True, max_wait_ms=30) as srv:
        yield srv


def _http(srv: ServerThread, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=srv.http_url, timeout=60) as c:
        return c.post("/dpo/loss", json=body, headers=AUTH)


def _grpc(srv: ServerThread, message: pb.ComputeLossRequest) -> pb.ComputeLossResponse:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        return pb_grpc.DpoServiceStub(channel).ComputeLoss(message, metadata=METADATA, timeout=60)


def _check_sums(d: dict[str, Any]) -> None:
    for side in ("chosen", "rejected"):
        tokens, ids = d[f"{side}_token_logps"], d[f"{side}_token_ids"]
        assert [len(t) for t in tokens] == d[f"{side}_tokens"] == [len(i) for i in ids]
        for per_token, total in zip(tokens, d[f"{side}_logps"], strict=True):
            assert sum(per_token) == pytest.approx(total, rel=1e-5, abs=1e-4)
            assert all(v <= 0.0 for v in per_token)


def test_token_logps_sum_to_the_sequence_logps(server: ServerThread) -> None:
    r = _http(server, {"pairs": PAIRS, "return_token_logps": True})
    assert r.status_code == 200, r.text
    d = r.json()
    _check_sums(d)
    byte = ByteTokenizer()
    assert d["chosen_token_ids"][0] == byte.encode(" 4", add_eos=True)
    assert d["chosen_token_ids"][2] == [80, 81, 82, 83] and d["rejected_token_ids"][2] == [90]
    plain = _http(server, {"pairs": PAIRS}).json()  # off by default: nothing extra
    for key in ("chosen_token_logps", "chosen_token_ids", "rejected_token_logps"):
        assert plain[key] is None
    assert plain["chosen_logps"] == d["chosen_logps"]


def test_same_numbers_over_grpc_and_the_client(server: ServerThread) -> None:
    body = {"pairs": PAIRS, "return_token_logps": True, "reference": "frozen"}
    over_http = _http(server, body).json()
    message = request_from_dict(body)
    assert message.return_token_logps is True
    raw = _grpc(server, message)
    assert list(raw.chosen_token_logps[2].token_ids) == [80, 81, 82, 83]
    over_grpc = response_from_proto(raw)
    for key in ("chosen_token_logps", "chosen_token_ids", "rejected_token_logps",
                "rejected_token_ids", "chosen_logps", "reference_chosen_logps"):  # fmt: skip
        assert over_grpc[key] == over_http[key], key
    out = DpoClient.http(server.http_url, API_KEY).compute_loss(PAIRS, return_token_logps=True)
    assert out.chosen_token_logps == over_http["chosen_token_logps"]
    plain = response_from_proto(_grpc(server, request_from_dict({"pairs": PAIRS})))
    assert plain["chosen_token_logps"] is None and plain["chosen_token_ids"] is None


def test_coalesced_requests_keep_their_own_rows(server: ServerThread) -> None:
    """Concurrent requests with and without the flag, coalesced into shared passes: each gets
    its own rows, and only those that asked get token log-probs."""
    bodies = [
        {"pairs": [PAIRS[i % 3], PAIRS[(i + 1) % 3]], "return_token_logps": i % 2 == 0}
        for i in range(6)
    ]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: _http(server, b).json(), bodies))
    for body, d in zip(bodies, answers, strict=True):
        if body["return_token_logps"]:
            _check_sums(d)
        else:
            assert d["chosen_token_logps"] is None


def test_train_step_returns_token_logps(server: ServerThread) -> None:
    body = {"pairs": PAIRS, "return_token_logps": True}
    before = _http(server, body).json()
    trained = _http(server, {**body, "train": True}).json()
    assert trained["trained"] is True
    _check_sums(trained)
    # computed before the step, in the train layout: the same values as the loss-only pass
    for got, want in zip(trained["chosen_token_logps"], before["chosen_token_logps"], strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_non_boolean_flag_is_refused(server: ServerThread) -> None:
    for value in ("true", 1, None, [True]):
        r = _http(server, {"pairs": PAIRS, "return_token_logps": value, "train": True})
        assert r.status_code == 422, value
        assert r.json()["errors"][0]["field"] == "return_token_logps"
    # gRPC: the field is a bool; a string on its wire number is not a boolean and cannot turn
    # the flag on (protobuf keeps it as an unknown field)
    wire = request_from_dict({"pairs": PAIRS}).SerializeToString() + b"\x62\x04true"
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary(
            "/dpo.v1.DpoService/ComputeLoss",
            request_serializer=lambda b: b,
            response_deserializer=pb.ComputeLossResponse.FromString,
        )
        answer = call(wire, metadata=METADATA, timeout=60)
    assert len(answer.chosen_token_logps) == 0 and len(answer.chosen_logps) == 3


# ------------------------------------------------------------------ response size
def test_the_size_bound_holds_and_defaults_fit() -> None:
    """The bound is above the real serialized size (a response as large as the default
    request limit allows), and at the default limits every admissible request fits."""
    settings = Settings()
    n_pairs, total = settings.max_pairs_per_request, settings.max_request_tokens
    per = (total - n_pairs) // (2 * n_pairs)  # one prompt token, two responses of `per`
    vocab = 2**21 - 1  # ids of up to 3 varint bytes
    pairs = [PairTokens([1], [vocab - 1] * per, [vocab - 1] * per) for _ in range(n_pairs)]
    bound = token_logps_response_bytes(pairs, vocab)
    assert bound <= settings.grpc_max_message_bytes
    data = {
        "loss": 1.0, "losses": [1.0] * n_pairs, "chosen_logps": [-1.5] * n_pairs,
        "rejected_logps": [-1.5] * n_pairs, "reference_chosen_logps": [-1.5] * n_pairs,
        "reference_rejected_logps": [-1.5] * n_pairs, "rewards_chosen": [0.1] * n_pairs,
        "rewards_rejected": [0.1] * n_pairs, "margins": [0.1] * n_pairs, "accuracy": 0.5,
        "chosen_tokens": [per] * n_pairs, "rejected_tokens": [per] * n_pairs,
        "num_tokens": total, "metrics": {f"m/{i}": 1.0 for i in range(20)},
        "loss_type": "sigmoid", "beta": 0.1, "model_version": 2**40, "trained": True,
        "grad_norm": 1.0, "new_model_version": 2**40, "request_id": "x" * 128,
        "loss_terms": {"sigmoid": 1.0, "sft": 1.0}, "loss_weights": {"sigmoid": 1.0, "sft": 1.0},
        "chosen_token_logps": [[-1.0e-3] * per] * n_pairs,
        "chosen_token_ids": [[vocab - 1] * per] * n_pairs,
        "rejected_token_logps": [[-1.0e-3] * per] * n_pairs,
        "rejected_token_ids": [[vocab - 1] * per] * n_pairs,
    }  # fmt: skip
    size = response_to_proto(data).ByteSize()
    assert size <= bound, (size, bound)
    assert size > 0.8 * bound  # and not a loose one


def test_a_response_past_the_grpc_limit_is_refused_before_it_runs() -> None:
    """With a small gRPC message limit, a request whose token log-probs may not fit is a
    clear 422 / INVALID_ARGUMENT on both protocols (the same request without the flag runs),
    and a train request is not applied."""
    long = {"prompt": "p", "chosen": "x" * 200, "rejected": "y" * 200}
    body = {"pairs": [long] * 12, "return_token_logps": True, "train": True}
    with running_server(grpc_max_message_bytes=32 * 1024) as srv:
        r = _http(srv, body)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "return_token_logps"
        assert "DPO_GRPC_MAX_MESSAGE_BYTES" in r.json()["errors"][0]["message"]
        with pytest.raises(grpc.RpcError) as info:
            _grpc(srv, request_from_dict(body))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("return_token_logps")
        assert srv.version == 0
        ok = _http(srv, {**body, "return_token_logps": False})
        assert ok.status_code == 200 and srv.version == 1
        small = _grpc(srv, request_from_dict({**body, "pairs": [long], "train": False}))
        assert len(small.chosen_token_logps[0].logps) == 201


def test_micro_batches_keep_the_pair_order() -> None:
    """With a small token budget the pairs run in several length-sorted micro-batches (loss
    only and train): token log-probs, ids and composed terms come back in request order."""
    pairs = [
        {"prompt_ids": [1] + [40 + i] * (3 * i + 1), "chosen_ids": [50 + i] * (i + 1),
         "rejected_ids": [60 + i] * (8 - i)}
        for i in range(8)
    ]  # fmt: skip
    body = {"pairs": pairs[::-1], "return_token_logps": True, "loss_type": ["sigmoid", "sft"]}
    with running_server(max_batch_tokens=48) as srv:
        loss_only = _http(srv, body).json()
        trained = _http(srv, {**body, "train": True}).json()
    for d in (loss_only, trained):
        _check_sums(d)
        assert d["chosen_token_ids"] == [p["chosen_ids"] for p in pairs[::-1]]
        assert d["rejected_token_ids"] == [p["rejected_ids"] for p in pairs[::-1]]
        sft = [-c / n for c, n in zip(d["chosen_logps"], d["chosen_tokens"], strict=True)]
        assert d["loss_terms"]["sft"] == pytest.approx(sum(sft) / len(sft), rel=1e-5)
    assert trained["trained"] is True
    assert trained["loss"] == pytest.approx(loss_only["loss"], rel=1e-4)
