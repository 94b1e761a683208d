"""gRPC API against a real combined server on loopback: every RPC, streaming, health,
reflection, error mapping, deadlines, message limits, the committed stubs and a Node client."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import API_KEY, ServerThread, small_settings
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.api.grpc.server import start_grpc_server
from dpo_service.api.grpc.servicer import SERVICE_NAME
from dpo_service.engine.admission import make_admission

ROOT = Path(__file__).resolve().parents[2]
AUTH = (("authorization", f"Bearer {API_KEY}"),)


def text_pair(prompt: str, chosen: str, rejected: str) -> pb.PreferencePair:
    return pb.PreferencePair(text=pb.TextTriple(prompt=prompt, chosen=chosen, rejected=rejected))


def token_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> pb.PreferencePair:
    return pb.PreferencePair(
        tokens=pb.TokenTriple(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected)
    )


PAIRS = [
    text_pair("Q: 2+2?", " 4", " five, probably"),
    text_pair("Say hi", "Hello!", "no"),
    token_pair([256, 72, 105], [33, 257], [63, 63, 257]),
]


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.DpoServiceStub:
    return pb_grpc.DpoServiceStub(channel)


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def trailer(err: Any, key: str) -> Any:
    return dict(err.trailing_metadata() or ()).get(key)


# ----------------------------------------------------------------------------- ComputeLoss
def test_compute_loss_defaults_and_shapes(
    stub: pb_grpc.DpoServiceStub, server: ServerThread
) -> None:
    res = stub.ComputeLoss(pb.ComputeLossRequest(pairs=PAIRS), timeout=30)
    n = len(PAIRS)
    assert len(res.losses) == len(res.chosen_logps) == len(res.margins) == n
    assert math.isclose(res.loss, sum(res.losses) / n, rel_tol=1e-6)
    assert res.beta == pytest.approx(0.1)  # unset beta → the REST default
    assert res.loss_type == pb.LOSS_TYPE_SIGMOID
    assert res.model_version == server.version and not res.trained
    assert not res.HasField("grad_norm") and not res.HasField("new_model_version")
    assert res.HasField("request_id") and len(res.request_id) == 32  # assigned by the server
    assert list(res.reference_chosen_logps) == []  # no reference given: none used
    assert res.chosen_tokens[2] == 2 and res.rejected_tokens[2] == 3
    assert {"rewards/chosen", "logps/chosen", "rewards/accuracies"} <= set(res.metrics)
    assert all(lp < 0 for lp in res.chosen_logps)


def test_unset_versus_zero_reference(stub: pb_grpc.DpoServiceStub) -> None:
    zero = [
        pb.PreferencePair(text=p.text, reference_chosen_logp=0.0, reference_rejected_logp=0.0)
        for p in PAIRS[:2]
    ]
    with_ref = stub.ComputeLoss(pb.ComputeLossRequest(pairs=zero, beta=0.5), timeout=30)
    without = stub.ComputeLoss(pb.ComputeLossRequest(pairs=PAIRS[:2], beta=0.5), timeout=30)
    assert list(with_ref.reference_chosen_logps) == [0.0, 0.0]  # given as 0.0: used
    assert list(without.reference_chosen_logps) == []  # absent: not used
    assert with_ref.loss == pytest.approx(without.loss)  # zero reference == reference-free


@pytest.mark.parametrize(
    "loss_type",
    [
        pb.LOSS_TYPE_SIGMOID,
        pb.LOSS_TYPE_HINGE,
        pb.LOSS_TYPE_IPO,
        pb.LOSS_TYPE_ROBUST,
        pb.LOSS_TYPE_SIMPO,
    ],
)
def test_every_loss_type(stub: pb_grpc.DpoServiceStub, loss_type: pb.LossType) -> None:
    req = pb.ComputeLossRequest(
        pairs=PAIRS, loss_type=loss_type, label_smoothing=0.1, simpo_gamma=0.3
    )
    res = stub.ComputeLoss(req, timeout=30)
    assert res.loss_type == loss_type and math.isfinite(res.loss)


def test_errors_map_to_grpc_status(stub: pb_grpc.DpoServiceStub, server: ServerThread) -> None:
    before = server.version
    err = rpc_error(
        stub.ComputeLoss,
        pb.ComputeLossRequest(pairs=[PAIRS[0], token_pair([1], [2, 3, 259], [4])]),
        timeout=30,
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("pairs[1].chosen_ids[2]: ")
    assert trailer(err, "dpo-error-code") == "invalid_argument"
    detail = pb.Error.FromString(trailer(err, "dpo-error-bin"))
    assert detail.field_violations[0].field == "pairs[1].chosen_ids[2]"
    assert detail.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    cases: list[tuple[pb.ComputeLossRequest, grpc.StatusCode, str]] = [
        (pb.ComputeLossRequest(), grpc.StatusCode.INVALID_ARGUMENT, "pairs"),
        (pb.ComputeLossRequest(pairs=PAIRS, loss_type=99), grpc.StatusCode.INVALID_ARGUMENT, "loss_type"),  # type: ignore[arg-type]
        (pb.ComputeLossRequest(pairs=PAIRS, reference=42), grpc.StatusCode.INVALID_ARGUMENT, "reference"),  # type: ignore[arg-type]
        (pb.ComputeLossRequest(pairs=[pb.PreferencePair()]), grpc.StatusCode.INVALID_ARGUMENT, "pairs[0]"),
        (pb.ComputeLossRequest(pairs=PAIRS, beta=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "beta"),
        (pb.ComputeLossRequest(pairs=PAIRS, beta=0.0), grpc.StatusCode.INVALID_ARGUMENT, "beta"),
        (pb.ComputeLossRequest(pairs=PAIRS, request_id=""), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (pb.ComputeLossRequest(pairs=PAIRS, train=True), grpc.StatusCode.UNAUTHENTICATED, "API key"),
    ]  # fmt: skip
    for request, code, needle in cases:
        err = rpc_error(stub.ComputeLoss, request, timeout=30)
        assert err.code() == code, (request, err.details())
        assert needle in err.details()
    wrong_key = (("authorization", "Bearer nope"),)
    err = rpc_error(
        stub.ComputeLoss, pb.ComputeLossRequest(pairs=PAIRS, train=True), metadata=wrong_key
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    stale = pb.ComputeLossRequest(pairs=PAIRS, train=True, expected_version=before + 100)
    err = rpc_error(stub.ComputeLoss, stale, metadata=AUTH, timeout=30)
    assert err.code() == grpc.StatusCode.ABORTED and trailer(err, "dpo-error-code") == "conflict"
    assert server.version == before


def test_undecodable_message_is_invalid_argument(channel: grpc.Channel) -> None:
    raw = channel.unary_unary(
        "/dpo.v1.DpoService/ComputeLoss",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # pairs[0].text.prompt = b"\xff": not UTF-8, so not a valid proto3 string
    err = rpc_error(raw, b"\x0a\x05\x0a\x03\x0a\x01\xff", timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dpo.v1.ComputeLossRequest" in err.details()


def test_train_steps_and_idempotent_retry(
    stub: pb_grpc.DpoServiceStub, server: ServerThread
) -> None:
    v0 = server.version
    req = pb.ComputeLossRequest(
        pairs=PAIRS, train=True, request_id="grpc-train-1", expected_version=v0
    )
    first = stub.ComputeLoss(req, metadata=AUTH, timeout=60)
    assert first.trained and first.model_version == v0 and first.new_model_version == v0 + 1
    assert first.grad_norm > 0 and first.request_id == "grpc-train-1"
    again = stub.ComputeLoss(req, metadata=AUTH, timeout=60)  # a retry: nothing applied twice
    assert again == first and server.version == v0 + 1


# ----------------------------------------------------------------------------- streaming
def test_stream_in_order_with_versions(stub: pb_grpc.DpoServiceStub, server: ServerThread) -> None:
    v0 = server.version
    batches: list[pb.ComputeLossRequest] = []
    for i in range(12):
        train = i % 2 == 0
        rid = f"stream-{v0}-{i}" if train else None
        batches.append(
            pb.ComputeLossRequest(pairs=PAIRS, beta=0.1 + 0.01 * i, train=train, request_id=rid)
        )
    batches.insert(5, pb.ComputeLossRequest(pairs=[token_pair([1], [], [2])]))  # a bad batch
    answers = list(
        stub.StreamComputeLoss(
            (pb.StreamComputeLossRequest(request=b) for b in batches), metadata=AUTH, timeout=120
        )
    )
    assert [a.sequence for a in answers] == list(range(len(batches)))
    version = v0
    for batch, answer in zip(batches, answers, strict=True):
        assert answer.model_version == version
        if answer.WhichOneof("outcome") == "error":
            assert answer.error.code == pb.ERROR_CODE_INVALID_ARGUMENT
            assert answer.error.field_violations[0].field == "pairs[0].chosen_ids"
            continue
        res = answer.response
        assert res.beta == pytest.approx(batch.beta) and res.model_version == version
        if batch.train:
            assert res.trained and res.new_model_version == version + 1
            version += 1
        else:
            assert not res.trained
    assert version == v0 + 6 == server.version


def test_stream_errors_do_not_end_the_stream(
    stub: pb_grpc.DpoServiceStub, server: ServerThread
) -> None:
    v0 = server.version
    batches = [
        pb.ComputeLossRequest(pairs=PAIRS, train=True),  # no key on this stream
        pb.ComputeLossRequest(pairs=PAIRS),
    ]
    answers = list(stub.StreamComputeLoss(pb.StreamComputeLossRequest(request=b) for b in batches))
    assert answers[0].error.code == pb.ERROR_CODE_UNAUTHENTICATED
    assert answers[0].error.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert answers[1].WhichOneof("outcome") == "response"
    assert server.version == v0


# ----------------------------------------------------------------------------- info, admin
def test_get_model_info(stub: pb_grpc.DpoServiceStub, server: ServerThread) -> None:
    counter = server.core.engine.events.requests.labels("model_info", "grpc", "ok")
    before = counter._value.get()
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    expected = server.core.engine.info()
    assert info.vocab_size == expected.vocab_size == 259
    assert info.parameters == expected.parameters and info.max_seq_len == 256
    assert (info.name, info.kind, info.dtype, info.device) == (
        expected.name,
        expected.kind,
        "float32",
        "cpu",
    )
    assert info.model_version == server.version and info.tokenizer == expected.tokenizer
    assert counter._value.get() == before + 1


def test_checkpoint_needs_key_and_calls_core(
    stub: pb_grpc.DpoServiceStub, server: ServerThread
) -> None:
    err = rpc_error(stub.Checkpoint, pb.CheckpointRequest(), timeout=10)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    core = server.core
    err = rpc_error(stub.Checkpoint, pb.CheckpointRequest(), metadata=AUTH, timeout=10)
    if hasattr(type(core), "checkpoint"):
        assert err.code() == grpc.StatusCode.NOT_FOUND  # this server has no checkpoint dir
    else:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    calls: list[int] = []

    async def fake_checkpoint() -> dict[str, Any]:
        calls.append(1)
        return {"path": "/tmp/ckpt/step-7", "model_version": 7}

    core.checkpoint = fake_checkpoint
    try:
        res = stub.Checkpoint(pb.CheckpointRequest(), metadata=AUTH, timeout=10)
    finally:
        del core.checkpoint
    assert calls == [1] and res.path == "/tmp/ckpt/step-7" and res.model_version == 7


# ----------------------------------------------------------------------------- health, reflection
def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dpo.v1.DpoService"):
        res = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert res.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = list(db.get_services())
    assert "dpo.v1.DpoService" in services and "grpc.health.v1.Health" in services
    file = db.FindFileContainingSymbol("dpo.v1.DpoService")
    assert file.name == "dpo/v1/dpo_service.proto" and file.package == "dpo.v1"
    assert {m.name for m in file.service[0].method} == {
        "ComputeLoss", "StreamComputeLoss", "GetModelInfo", "Checkpoint",
    }  # fmt: skip


# ----------------------------------------------------------------------------- deadlines
def test_expired_work_never_reaches_the_model(
    stub: pb_grpc.DpoServiceStub, server: ServerThread
) -> None:
    """Hold the engine's worker; a train call whose deadline passes while queued must not
    apply a step later, while the call ahead of it (long deadline) does."""
    engine = server.core.engine
    dropped = sum(
        s.value
        for m in engine.events.dropped.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
    v0 = server.version
    engine._executor.submit(time.sleep, 1.0)
    ahead = stub.ComputeLoss.future(
        pb.ComputeLossRequest(pairs=PAIRS, train=True), metadata=AUTH, timeout=30
    )
    time.sleep(0.2)  # the batcher has taken `ahead` and waits for the worker
    err = rpc_error(
        stub.ComputeLoss, pb.ComputeLossRequest(pairs=PAIRS, train=True), metadata=AUTH, timeout=0.3
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ahead.result().new_model_version == v0 + 1
    deadline = time.monotonic() + 5
    while engine.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert server.version == v0 + 1
    after = sum(
        s.value
        for m in engine.events.dropped.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert after == dropped + 1


# ----------------------------------------------------------------------------- not ready, limits
async def test_not_ready_is_unavailable_and_big_messages_are_exhausted() -> None:
    """A gRPC listener whose model has not loaded: health NOT_SERVING, calls UNAVAILABLE with
    retry-after; a message over grpc_max_message_bytes is RESOURCE_EXHAUSTED (grpc itself)."""
    settings = small_settings(grpc_max_message_bytes=2048)
    listener = await start_grpc_server(make_admission(settings), settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listener.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            res = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            assert res.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = pb_grpc.DpoServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ComputeLoss(pb.ComputeLossRequest(pairs=PAIRS), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dict(info.value.trailing_metadata())["retry-after"] == "1"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            big = pb.ComputeLossRequest(pairs=[text_pair("x" * 4000, "a", "b")])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ComputeLoss(big, timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await listener.set_serving(True)
            res = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert res.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await listener.stop(grace=0.1)
    await asyncio.sleep(0)


# ----------------------------------------------------------------------------- stubs, Node
def test_committed_stubs_are_regenerated_identically(tmp_path: Path) -> None:
    import grpc_tools  # noqa: F401  (the generator must be installed)

    env = {**os.environ, "GEN_OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh")], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0 and "expected" in proc.stderr and not os.environ.get("CI"):
        pytest.skip(f"another grpcio-tools version: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    committed = ROOT / "service" / "dpo_service" / "api" / "grpc" / "gen"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
    )
    for name in names:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    assert importlib.util.find_spec("dpo") is None  # no top-level `dpo` package


def test_node_client(server: ServerThread) -> None:
    node = shutil.which("node")
    modules = ROOT / ".ci" / "node" / "node_modules" / "@grpc" / "grpc-js"
    if node is None or not modules.is_dir():
        if os.environ.get("CI"):
            pytest.fail(
                "CI: node and .ci/node/node_modules are required (npm ci --prefix .ci/node)"
            )
        pytest.skip("node or .ci/node/node_modules missing (npm ci --prefix .ci/node)")
    proc = subprocess.run(
        [node, str(ROOT / "tests" / "node" / "compute_loss.mjs"), server.grpc_target],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
