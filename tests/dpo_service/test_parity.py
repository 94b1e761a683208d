"""REST and gRPC on one running server: identical numbers, the same error class (and message)
for the same bad input, and nothing applied by any bad input."""

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
from dpo_service.client import DpoClient, DpoClientError
from dpo_service.errors import GRPC_STATUS, ErrorCode

TEXT = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five, probably"},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
    {"prompt": "", "chosen": "éè ünïcode ✓", "rejected": "ascii"},
]
TOKENS = [
    {"prompt_ids": [256, 72, 105], "chosen_ids": [33, 257], "rejected_ids": [63, 63, 257]},
    {"prompt_ids": [256, 1, 2, 3, 4], "chosen_ids": [5, 6, 7, 257], "rejected_ids": [8, 257]},
]
WITH_REF = [{**p, "reference_chosen_logp": -20.5, "reference_rejected_logp": -18.0} for p in TEXT]
KEY = {"Authorization": f"Bearer {API_KEY}"}


class Both:
    """The same request over REST (raw httpx JSON) and over gRPC (raw stub)."""

    def __init__(self, server: ServerThread) -> None:
        self.http = httpx.Client(base_url=server.http_url, timeout=60)
        self.channel = grpc.insecure_channel(server.grpc_target)
        self.stub = pb_grpc.DpoServiceStub(self.channel)

    def rest(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        content = json.dumps(body, allow_nan=True)  # NaN/inf reach the server as JSON literals
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return self.http.post("/dpo/loss", content=content, headers=hdrs)

    def grpc(self, request: pb.ComputeLossRequest, headers: dict[str, str] | None = None) -> Any:
        metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())
        return self.stub.ComputeLoss(request, metadata=metadata, timeout=60)

    def close(self) -> None:
        self.http.close()
        self.channel.close()


@pytest.fixture(scope="module")
def both(server: ServerThread) -> Iterator[Both]:
    b = Both(server)
    yield b
    b.close()


SUCCESS_CASES: dict[str, dict[str, Any]] = {
    "text-defaults": {"pairs": TEXT},
    "tokens-ipo": {"pairs": TOKENS, "beta": 0.25, "loss_type": "ipo"},
    "reference-robust": {"pairs": WITH_REF, "loss_type": "robust", "label_smoothing": 0.1},
    "simpo": {"pairs": TEXT, "loss_type": "simpo", "simpo_gamma": 0.7, "beta": 2.0},
    "hinge-no-reference": {"pairs": TOKENS, "loss_type": "hinge", "reference": "none"},
    "sigmoid-smoothing": {"pairs": WITH_REF[:1], "beta": 0.5, "label_smoothing": 0.2},
}


@pytest.mark.parametrize("name", list(SUCCESS_CASES))
def test_identical_numbers(both: Both, name: str) -> None:
    body = {**SUCCESS_CASES[name], "request_id": f"parity-{name}"}
    rest = both.rest(body)
    assert rest.status_code == 200, rest.text
    over_grpc = response_from_proto(both.grpc(request_from_dict(body)))
    assert over_grpc == rest.json()  # exactly equal floats, every field


def test_clients_give_equal_results(server: ServerThread) -> None:
    pairs = [("Q: 2+2?", " 4", " five"), ([256, 10, 11], [12, 257], [13, 14, 257])]
    with DpoClient.http(server.http_url) as h, DpoClient.grpc(server.grpc_target) as g:
        a = h.compute_loss(pairs, beta=0.3, loss_type="hinge", request_id="same")
        b = g.compute_loss(pairs, beta=0.3, loss_type="hinge", request_id="same")
        assert a == b
        assert h.model_info() == g.model_info()


def _body(**kw: Any) -> dict[str, Any]:
    return {"pairs": TEXT[:2], **kw}


# (REST body, gRPC request if the body cannot say it in proto, headers, same message)
ERROR_CASES: dict[str, tuple[dict[str, Any], pb.ComputeLossRequest | None, dict[str, str], bool]] = {
    "empty pairs": ({"pairs": []}, None, {}, True),
    "empty text response": (_body(pairs=[{"prompt": "p", "chosen": "", "rejected": "r"}]), None, {}, True),
    "empty token response": (_body(pairs=[{**TOKENS[0], "chosen_ids": []}]), None, {}, True),
    "token id = vocab": (_body(pairs=[TOKENS[0], {**TOKENS[1], "rejected_ids": [1, 259]}]), None, {}, True),
    "negative token id": (_body(pairs=[{**TOKENS[0], "prompt_ids": [-1]}]), None, {}, True),
    "too long": (_body(pairs=[{"prompt_ids": [1] * 200, "chosen_ids": [2] * 100, "rejected_ids": [3]}]), None, {}, True),
    "too long text": (_body(pairs=[{"prompt": "x" * 300, "chosen": "a", "rejected": "b"}]), None, {}, True),
    "beta 0": (_body(beta=0.0), None, {}, True),
    "beta < 0": (_body(beta=-1.0), None, {}, True),
    "beta NaN": (_body(beta=math.nan), None, {}, True),
    "beta inf": (_body(beta=math.inf), None, {}, True),
    "label smoothing 0.5": (_body(label_smoothing=0.5), None, {}, True),
    "simpo gamma -inf": (_body(simpo_gamma=-math.inf), None, {}, True),
    "unknown loss type": (_body(loss_type="dpo++"), pb.ComputeLossRequest(pairs=[pb.PreferencePair(text=pb.TextTriple(prompt="a", chosen="b", rejected="c"))], loss_type=17), {}, False),  # type: ignore[arg-type]
    "reference missing for a pair": (_body(pairs=[WITH_REF[0], TEXT[1]]), None, {}, True),
    "reference none with log-probs": (_body(pairs=WITH_REF, reference="none"), None, {}, True),
    "250 bad pairs": ({"pairs": [{**WITH_REF[0], "reference_chosen_logp": math.nan}] * 250}, None, {}, True),
    "reference nan": (_body(pairs=[{**WITH_REF[0], "reference_chosen_logp": math.nan}]), None, {}, True),
    "pair neither text nor tokens": ({"pairs": [{}]}, pb.ComputeLossRequest(pairs=[pb.PreferencePair()]), {}, False),
    "request_id empty": (_body(request_id=""), None, {}, True),
    "request_id too long": (_body(request_id="x" * 129), None, {}, True),
    "expected_version without train": (_body(expected_version=0), None, {}, True),
    "expected_version < 0": (_body(expected_version=-1, train=True), None, KEY, True),
    "train without key": (_body(train=True), None, {}, True),
    "train with a wrong key": (_body(train=True), None, {"Authorization": "Bearer wrong"}, True),
    "stale expected_version": (_body(train=True, expected_version=10**6), None, KEY, True),
}  # fmt: skip


def test_same_error_class_for_the_same_bad_input(both: Both, server: ServerThread) -> None:
    v0 = server.version
    for name, (body, proto, headers, same_message) in ERROR_CASES.items():
        rest = both.rest(body, headers)
        rest_body = rest.json()
        code = ErrorCode(rest_body["code"])
        with pytest.raises(grpc.RpcError) as info:
            both.grpc(proto if proto is not None else request_from_dict(body), headers)
        err: Any = info.value
        assert err.code().name == GRPC_STATUS[code], (name, rest.status_code, err.details())
        assert dict(err.trailing_metadata())["dpo-error-code"] == code.value, name
        assert rest.status_code != 500 and err.code() not in (
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.INTERNAL,
        )
        if same_message:
            assert err.details() == rest_body["detail"], name
    expected = {
        "train without key": 401, "stale expected_version": 409, "beta NaN": 422,
        "token id = vocab": 422, "empty pairs": 422, "unknown loss type": 422, "too long": 422,
    }  # fmt: skip
    for name, status in expected.items():
        body, _, headers, _ = ERROR_CASES[name]
        assert both.rest(body, headers).status_code == status, name
    assert server.version == v0  # no bad input applied anything


def test_oversized_requests_on_both_protocols() -> None:
    limits = {"max_body_bytes": 4096, "grpc_max_message_bytes": 4096}
    body = _body(pairs=[{"prompt": "x" * 5000, "chosen": "a", "rejected": "b"}])
    with running_server(**limits) as srv:
        b = Both(srv)
        try:
            rest = b.rest(body)
            assert rest.status_code == 413 and rest.json()["code"] == "too_large"
            with pytest.raises(grpc.RpcError) as info:
                b.grpc(request_from_dict(body))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert b.rest(_body()).status_code == 200  # small requests still fine
        finally:
            b.close()
        for client in (DpoClient.http(srv.http_url), DpoClient.grpc(srv.grpc_target)):
            with client, pytest.raises(DpoClientError) as caught:
                client.compute_loss(body["pairs"])
            assert caught.value.code is ErrorCode.TOO_LARGE and caught.value.attempts == 1
