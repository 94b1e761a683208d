"""Hypothesis-generated gRPC requests against a real server: well-typed messages with hostile
values, and raw byte strings that may not parse at all. No call may end in UNKNOWN or INTERNAL,
and the model only moves for valid keyed train calls (counted exactly)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import API_KEY, ServerThread, running_server
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
IDS = st.lists(st.one_of(st.integers(0, 300), INT64), max_size=12)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
TEXT = st.text(max_size=40)


@st.composite
def pairs(draw: st.DrawFn) -> pb.PreferencePair:
    pair = pb.PreferencePair()
    kind = draw(st.sampled_from(["text", "tokens", "none"]))
    if kind == "text":
        pair.text.CopyFrom(pb.TextTriple(prompt=draw(TEXT), chosen=draw(TEXT), rejected=draw(TEXT)))
    elif kind == "tokens":
        pair.tokens.CopyFrom(
            pb.TokenTriple(prompt_ids=draw(IDS), chosen_ids=draw(IDS), rejected_ids=draw(IDS))
        )
    if draw(st.booleans()):
        pair.reference_chosen_logp = draw(FLOATS)
    if draw(st.booleans()):
        pair.reference_rejected_logp = draw(FLOATS)
    return pair


@st.composite
def requests(draw: st.DrawFn) -> pb.ComputeLossRequest:
    req = pb.ComputeLossRequest(
        pairs=draw(st.lists(pairs(), max_size=4)),
        loss_type=draw(st.integers(-3, 9)),  # includes values outside the enum
        reference=draw(st.integers(-3, 6)),
        train=draw(st.booleans()),
    )
    for name, strategy in (
        ("beta", FLOATS),
        ("label_smoothing", FLOATS),
        ("simpo_gamma", FLOATS),
        ("request_id", st.text(max_size=140)),
        ("expected_version", INT64),
    ):
        if draw(st.booleans()):
            setattr(req, name, draw(strategy))
    return req


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    with running_server(enable_http=False, max_pairs_per_request=8) as srv:
        yield srv


def test_fuzz_compute_loss(fuzz_server: ServerThread) -> None:
    start = fuzz_server.version
    trained: set[int] = set()
    with grpc.insecure_channel(fuzz_server.grpc_target) as channel:
        stub = pb_grpc.DpoServiceStub(channel)

        @given(request=requests(), keyed=st.booleans())
        @FUZZ
        def run(request: pb.ComputeLossRequest, keyed: bool) -> None:
            metadata = (("authorization", f"Bearer {API_KEY}"),) if keyed else ()
            try:
                response = stub.ComputeLoss(request, metadata=metadata, timeout=60)
            except grpc.RpcError as err:
                assert err.code() not in FORBIDDEN, (err.code(), err.details(), request)
                return
            if response.trained:
                assert keyed, "a step was applied without the key"
                trained.add(response.new_model_version)

        run()
    assert fuzz_server.version - start == len(trained)


def test_fuzz_raw_bytes(fuzz_server: ServerThread) -> None:
    """Arbitrary bytes as the request body of every unary RPC: never UNKNOWN/INTERNAL."""
    start = fuzz_server.version
    trained: set[int] = set()
    with grpc.insecure_channel(fuzz_server.grpc_target) as channel:
        calls = [
            channel.unary_unary(f"/dpo.v1.DpoService/{name}")
            for name in ("ComputeLoss", "GetModelInfo", "Checkpoint")
        ]

        @given(body=st.binary(max_size=200), which=st.integers(0, 2), keyed=st.booleans())
        @FUZZ
        def run(body: bytes, which: int, keyed: bool) -> None:
            metadata = (("authorization", f"Bearer {API_KEY}"),) if keyed else ()
            try:
                raw = calls[which](body, metadata=metadata, timeout=60)
            except grpc.RpcError as err:
                assert err.code() not in FORBIDDEN, (err.code(), err.details(), body)
                return
            if which == 0:
                response = pb.ComputeLossResponse.FromString(raw)
                if response.trained:
                    assert keyed
                    trained.add(response.new_model_version)

        run()
    assert fuzz_server.version - start == len(trained)
