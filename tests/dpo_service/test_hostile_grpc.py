"""Hostile gRPC clients against a real server (issue 10, round 2): idempotency keys on calls
and streams, cancelled and expired calls, messages of millions of ids, oversized and
unparsable messages to every RPC, invalid UTF-8, strict field naming, duplicate keys, and
metrics that agree with what clients saw. The HTTP side is in ``test_hostile_http.py``."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest

from conftest import API_KEY, ServerThread, running_server
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from hostile_support import busy_worker, metric, metrics, queued, requests_total, wait_until

KEY = ("authorization", f"Bearer {API_KEY}")
SERVICE = "/dpo.v1.DpoService/"


def text_pair(prompt: str = "Q: 2+2?", chosen: str = " 4", rejected: str = " five") -> Any:
    return pb.PreferencePair(text=pb.TextTriple(prompt=prompt, chosen=chosen, rejected=rejected))


def ids_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> Any:
    return pb.PreferencePair(
        tokens=pb.TokenTriple(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected)
    )


HEAVY = [ids_pair(list(range(1, 120)), list(range(2, 130)), list(range(3, 130)))] * 32


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    with running_server(enable_http=True) as server:
        yield server


@pytest.fixture(scope="module")
def channel(srv: ServerThread) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(srv.grpc_target, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.DpoServiceStub:
    return pb_grpc.DpoServiceStub(channel)


def raw_call(channel: grpc.Channel, method: str) -> Any:
    """A unary method that sends bytes exactly as given."""
    return channel.unary_unary(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )


def trailers(err: Any) -> dict[str, Any]:
    return dict(err.trailing_metadata() or ())


def violations(err: Any) -> list[str]:
    detail = pb.Error.FromString(trailers(err)["dpo-error-bin"])
    return [v.field for v in detail.field_violations]


# ------------------------------------------------------------------------ 1. idempotency keys
def test_x_request_id_metadata_is_not_an_idempotency_key(
    srv: ServerThread, stub: pb_grpc.DpoServiceStub
) -> None:
    v0 = srv.version
    metadata = (KEY, ("x-request-id", "trace-g"))
    unary = [
        stub.ComputeLoss(
            pb.ComputeLossRequest(pairs=[text_pair(chosen=f" {n}")], train=True),
            metadata=metadata,
            timeout=60,
        )
        for n in (4, 5)
    ]
    stream = list(
        stub.StreamComputeLoss(
            iter(
                [
                    pb.StreamComputeLossRequest(
                        request=pb.ComputeLossRequest(pairs=[text_pair(chosen=f" {n}")], train=True)
                    )
                    for n in (6, 7, 8)
                ]
            ),
            metadata=metadata,
            timeout=60,
        )
    )
    assert [r.new_model_version for r in unary] == [v0 + 1, v0 + 2]
    assert all(r.trained for r in unary)
    assert [a.WhichOneof("outcome") for a in stream] == ["response"] * 3
    assert [a.response.new_model_version for a in stream] == [v0 + 3, v0 + 4, v0 + 5]
    assert srv.version == v0 + 5


def test_a_request_id_reused_for_another_request_is_aborted(
    srv: ServerThread, stub: pb_grpc.DpoServiceStub
) -> None:
    first = stub.ComputeLoss(
        pb.ComputeLossRequest(pairs=[text_pair()], train=True, request_id="g-reuse"),
        metadata=(KEY,),
        timeout=60,
    )
    v1 = srv.version
    again = stub.ComputeLoss(
        pb.ComputeLossRequest(pairs=[text_pair()], train=True, request_id="g-reuse"),
        metadata=(KEY,),
        timeout=60,
    )
    assert again == first
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeLoss(
            pb.ComputeLossRequest(pairs=[text_pair()], train=True, request_id="g-reuse", beta=0.3),
            metadata=(KEY,),
            timeout=60,
        )
    err: Any = caught.value
    assert err.code() == grpc.StatusCode.ABORTED
    assert trailers(err)["dpo-error-code"] == "conflict" and "g-reuse" in err.details()
    messages = [
        pb.StreamComputeLossRequest(
            request=pb.ComputeLossRequest(pairs=pairs, train=True, request_id="g-stream")
        )
        for pairs in ([text_pair()], [text_pair(chosen=" 5")], [text_pair()])
    ]
    answers = list(stub.StreamComputeLoss(iter(messages), metadata=(KEY,), timeout=60))
    assert answers[0].WhichOneof("outcome") == "response"
    assert answers[1].error.code == pb.ERROR_CODE_CONFLICT
    assert answers[2].response == answers[0].response  # the retry is replayed
    assert srv.version == v1 + 1


# ------------------------------------------------------------------------ 6/13. cancel, deadline
@pytest.mark.slow
def test_cancelled_calls_are_dropped_and_counted_cancelled(
    srv: ServerThread, stub: pb_grpc.DpoServiceStub
) -> None:
    before = metrics(srv)
    with busy_worker(srv):
        calls = [stub.ComputeLoss.future(pb.ComputeLossRequest(pairs=HEAVY), timeout=60)]
        calls += [
            stub.ComputeLoss.future(pb.ComputeLossRequest(pairs=HEAVY), timeout=60)
            for _ in range(19)
        ]
        wait_until(lambda: queued(srv) >= 20, what="20 queued calls")
        for call in calls:
            call.cancel()
        wait_until(
            lambda: (
                requests_total(metrics(srv), "compute_loss", "grpc", "cancelled")
                >= requests_total(before, "compute_loss", "grpc", "cancelled") + 20
            ),
            what="20 cancelled calls",
        )
    small = stub.ComputeLoss(pb.ComputeLossRequest(pairs=[text_pair()]), timeout=10)
    after = metrics(srv)
    for code, expected in (("ok", 1), ("cancelled", 20)):
        delta = requests_total(after, "compute_loss", "grpc", code) - requests_total(
            before, "compute_loss", "grpc", code
        )
        assert delta == expected, (code, delta)
    for reason, expected in (("cancelled", 20), ("deadline", 0)):
        delta = metric(after, "dpo_dropped_requests_total", reason=reason) - metric(
            before, "dpo_dropped_requests_total", reason=reason
        )
        assert delta == expected, (reason, delta)
    assert (
        metric(after, "dpo_tokens_total") - metric(before, "dpo_tokens_total") == small.num_tokens
    )


@pytest.mark.slow
def test_expired_calls_are_counted_deadline_exceeded(
    srv: ServerThread, stub: pb_grpc.DpoServiceStub
) -> None:
    before = metrics(srv)
    with busy_worker(srv):
        calls = [
            stub.ComputeLoss.future(pb.ComputeLossRequest(pairs=[text_pair()]), timeout=0.5)
            for _ in range(3)
        ]
        codes = [c.exception().code() for c in calls]  # type: ignore[union-attr]
        time.sleep(0.3)
    wait_until(lambda: srv.core.engine.pending() == 0, what="an empty queue")
    after = metrics(srv)
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    delta = requests_total(after, "compute_loss", "grpc", "deadline_exceeded") - requests_total(
        before, "compute_loss", "grpc", "deadline_exceeded"
    )
    assert delta == 3
    for reason, expected in (("deadline", 3), ("cancelled", 0)):
        got = metric(after, "dpo_dropped_requests_total", reason=reason) - metric(
            before, "dpo_dropped_requests_total", reason=reason
        )
        assert got == expected, (reason, got)
    assert requests_total(after, "compute_loss", "grpc", "ok") == requests_total(
        before, "compute_loss", "grpc", "ok"
    )


# ------------------------------------------------------------------------ 7. millions of ids
def _ids_message(n: int) -> bytes:
    """A ComputeLossRequest whose one pair has ``n`` prompt ids (1 byte each on the wire)."""
    payload = b"\x07" * n
    prompt = b"\x0a" + _varint(len(payload)) + payload
    tokens = prompt + b"\x12\x01\x01" + b"\x1a\x01\x02"
    pair = b"\x12" + _varint(len(tokens)) + tokens  # PreferencePair.tokens = 2
    return b"\x0a" + _varint(len(pair)) + pair  # ComputeLossRequest.pairs = 1


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


@pytest.mark.slow
def test_millions_of_ids_are_refused_before_they_are_materialised(
    srv: ServerThread, channel: grpc.Channel
) -> None:
    """Four clients sending ~7.5 MB messages of 7.5M ids (3 each), without a key:
    INVALID_ARGUMENT, counted from the message's bytes before it is parsed. Python holds the
    received bytes and no list of ids: materialised, each call would take a 60 MB list (8
    bytes per id) and a validated copy, ~0.5 GB for four; the traced peak stays under 128 MiB
    (four messages in flight, twice each). /health/live keeps answering meanwhile."""
    message = _ids_message(7_500_000)
    assert pb.ComputeLossRequest.FromString(message).pairs[0].tokens.chosen_ids == [1]
    assert len(message) < srv.settings.grpc_max_message_bytes
    call = raw_call(channel, "ComputeLoss")
    done = threading.Event()
    latencies: list[float] = []

    def probe() -> None:
        with httpx.Client(base_url=srv.http_url, timeout=30) as c:
            while not done.is_set() or not latencies:
                started = time.monotonic()
                assert c.get("/health/live").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    def send(_: int) -> Any:
        while not latencies:  # the prober is up
            time.sleep(0.01)
        errors = []
        for _ in range(3):
            try:
                call(message, timeout=60)
            except grpc.RpcError as exc:
                errors.append(exc)
        return errors

    tracemalloc.start()
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            errors = [e for batch in pool.map(send, range(4)) for e in batch]
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        done.set()
        prober.join(30)
    assert len(errors) == 12
    for err in errors:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than the limit" in err.details()
        assert violations(err)[0].startswith("pairs")
    print(
        f"12 calls in {elapsed:.2f}s; traced peak {peak / 2**20:.1f} MiB; "
        f"/health/live n={len(latencies)} max {max(latencies):.3f}s"
    )
    assert peak < 128 * 2**20, peak
    # every probe answered, none stalled (how many fit in depends on how fast the load went)
    assert latencies and max(latencies) < 1.0, max(latencies)


# ------------------------------------------------------------------------ 11. error shape
def test_unparsable_messages_are_invalid_argument_on_every_rpc(
    srv: ServerThread, channel: grpc.Channel
) -> None:
    garbage = b"\xff\xff\xff\xff"
    for method in ("ComputeLoss", "GetModelInfo", "Checkpoint"):
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(channel, method)(garbage, metadata=(KEY,), timeout=30)
        err: Any = caught.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())
        assert trailers(err)["dpo-error-code"] == "invalid_argument", method
    stream = channel.stream_stream(
        SERVICE + "StreamComputeLoss", request_serializer=None, response_deserializer=None
    )
    good = pb.StreamComputeLossRequest(request=pb.ComputeLossRequest(pairs=[text_pair()]))
    answers = [
        pb.StreamComputeLossResponse.FromString(a)
        for a in stream(iter([garbage, good.SerializeToString()]), timeout=30)
    ]
    assert answers[0].error.code == pb.ERROR_CODE_INVALID_ARGUMENT
    assert answers[1].WhichOneof("outcome") == "response"


def test_a_message_over_the_limit_carries_the_error_trailer(
    srv: ServerThread, channel: grpc.Channel
) -> None:
    limit = srv.settings.grpc_max_message_bytes
    text = pb.ComputeLossRequest(pairs=[text_pair(prompt="x" * (limit + 1000))])
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.DpoServiceStub(channel).ComputeLoss(text, timeout=30)
    err: Any = caught.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers(err)["dpo-error-code"] == "too_large"
    assert str(limit) in err.details()
    huge = pb.ComputeLossRequest(pairs=[text_pair(prompt="x" * (2 * limit + 1000))])
    with pytest.raises(grpc.RpcError) as caught:  # grpc's own limit: no trailer possible
        pb_grpc.DpoServiceStub(channel).ComputeLoss(huge, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ 9. invalid UTF-8
def test_text_that_is_not_valid_utf8_is_invalid_argument(
    srv: ServerThread, channel: grpc.Channel
) -> None:
    v0 = srv.version
    good = pb.ComputeLossRequest(pairs=[text_pair(prompt="AAA")], train=True).SerializeToString()
    for bad in (b"\xed\xa0\x80", b"\xff\xfe\xfd"):  # an encoded surrogate; not UTF-8 at all
        message = good.replace(b"AAA", bad)
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(channel, "ComputeLoss")(message, metadata=(KEY,), timeout=30)
        err: Any = caught.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailers(err)["dpo-error-code"] == "invalid_argument"
    answer = pb_grpc.DpoServiceStub(channel).ComputeLoss(
        pb.ComputeLossRequest(pairs=[text_pair()]), timeout=30
    )
    assert answer.num_tokens > 0 and srv.version == v0


# ------------------------------------------------------------------------ 12. fields and keys
def test_errors_name_the_right_field(stub: pb_grpc.DpoServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeLoss(
            pb.ComputeLossRequest(
                pairs=[text_pair()], loss_type=pb.LOSS_TYPE_SIMPO, simpo_gamma=-1.0
            ),
            timeout=30,
        )
    err: Any = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err) == ["simpo_gamma"], err.details()


def test_two_authorization_values_are_unauthenticated(
    srv: ServerThread, stub: pb_grpc.DpoServiceStub
) -> None:
    v0 = srv.version
    for second in (KEY, ("authorization", "Bearer wrong")):
        metadata = (KEY, second)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeLoss(
                pb.ComputeLossRequest(pairs=[text_pair()], train=True),
                metadata=metadata,
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Checkpoint(pb.CheckpointRequest(), metadata=metadata, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        message = pb.StreamComputeLossRequest(
            request=pb.ComputeLossRequest(pairs=[text_pair()], train=True)
        )
        answers = list(stub.StreamComputeLoss(iter([message]), metadata=metadata, timeout=30))
        assert answers[0].error.code == pb.ERROR_CODE_UNAUTHENTICATED
    assert srv.version == v0


@pytest.mark.slow
def test_with_require_key_for_loss_the_key_comes_before_the_message() -> None:
    with (
        running_server(enable_http=False, require_key_for_loss=True) as server,
        grpc.insecure_channel(server.grpc_target) as ch,
    ):
        stub = pb_grpc.DpoServiceStub(ch)
        bad_messages = [
            b"\xff\xff\xff",
            pb.ComputeLossRequest().SerializeToString(),
            pb.ComputeLossRequest(pairs=[text_pair()], beta=-1.0).SerializeToString(),
        ]
        for raw in bad_messages:
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as caught:
                    raw_call(ch, "ComputeLoss")(raw, metadata=metadata, timeout=30)
                err: Any = caught.value
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(ch, "ComputeLoss")(bad_messages[0], metadata=(KEY,), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert stub.ComputeLoss(
            pb.ComputeLossRequest(pairs=[text_pair()]), metadata=(KEY,), timeout=30
        ).num_tokens
