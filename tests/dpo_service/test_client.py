"""The Python client over both protocols: one interface, retries only on overload /
unavailability (Retry-After honoured, bounded), deadlines, auto request ids for training."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from conftest import API_KEY, ServerThread, running_server
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.client import (
    CheckpointResult,
    DpoClient,
    DpoClientError,
    LossResult,
    ModelInfo,
    RetryPolicy,
)
from dpo_service.errors import ErrorCode

PAIRS: list[Any] = [
    ("Q: 2+2?", " 4", " five, probably"),
    ([256, 72, 105], [33, 257], [63, 63, 257]),
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
]
FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
Factory = Callable[..., DpoClient]


def make_http(server: ServerThread) -> Factory:
    return lambda **kw: DpoClient.http(server.http_url, **kw)


def make_grpc(server: ServerThread) -> Factory:
    return lambda **kw: DpoClient.grpc(server.grpc_target, **kw)


@pytest.fixture(params=["http", "grpc"])
def factory(request: pytest.FixtureRequest, server: ServerThread) -> Factory:
    return make_http(server) if request.param == "http" else make_grpc(server)


# ----------------------------------------------------------------------------- a scripted HTTP fake
class FakeHttp:
    """A tiny HTTP server answering from a script of (status, body, headers, delay_s); the
    last entry repeats. Records every request body."""

    def __init__(self, script: list[tuple[int, Any, dict[str, str], float]]) -> None:
        self.script = list(script)
        self.bodies: list[Any] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.bodies.append(json.loads(raw) if raw else None)
                status, body, headers, delay = (
                    fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                )
                time.sleep(delay)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def real_body(server: ServerThread) -> dict[str, Any]:
    r = httpx.post(f"{server.http_url}/dpo/loss", json={"pairs": [PAIRS[2]]}, timeout=30)
    assert r.status_code == 200
    return dict(r.json())


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeHttp]]:
    made: list[FakeHttp] = []

    def build(script: list[tuple[int, Any, dict[str, str], float]]) -> FakeHttp:
        made.append(FakeHttp(script))
        return made[-1]

    yield build
    for f in made:
        f.close()


# ----------------------------------------------------------------------------- the interface
def test_one_interface_over_both(factory: Factory, server: ServerThread) -> None:
    with factory() as client:
        out = client.compute_loss(PAIRS, beta=0.2, loss_type="ipo")
        info = client.model_info()
    assert isinstance(out, LossResult) and isinstance(info, ModelInfo)
    assert len(out.losses) == 3 and out.loss_type == "ipo" and out.beta == pytest.approx(0.2)
    assert out.chosen_tokens[1] == 2 and out.reference_chosen_logps is None and not out.trained
    assert info.vocab_size == 259 and info.model_version == out.model_version == server.version


def test_train_gets_an_auto_request_id(factory: Factory, server: ServerThread) -> None:
    v0 = server.version
    with factory(api_key=API_KEY) as client:
        out = client.compute_loss(PAIRS, train=True)
        assert out.trained and out.new_model_version == v0 + 1
        assert out.request_id is not None and len(out.request_id) == 32
        body = client.build_request(PAIRS, train=True)
        assert body["request_id"] != out.request_id  # a fresh one per call
        assert "request_id" not in client.build_request(PAIRS)  # loss-only: the server's
        again = client.compute_loss(PAIRS, train=True, request_id=out.request_id)
    assert again == out and server.version == v0 + 1  # replay applies nothing


def test_errors_carry_the_service_code(factory: Factory, server: ServerThread) -> None:
    v0 = server.version
    with factory(retry=FAST) as client:
        with pytest.raises(DpoClientError) as caught:
            client.compute_loss([([1], [2, 300], [3])])
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT and caught.value.attempts == 1
        assert caught.value.errors[0][0] == "pairs[0].chosen_ids[1]"
        assert caught.value.status in (422, "INVALID_ARGUMENT")
        for bad in ({"beta": float("nan")}, {"no_such_field": 1}):
            with pytest.raises(DpoClientError) as caught:
                client.compute_loss(PAIRS, **bad)
            assert caught.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(DpoClientError) as caught:
            client.compute_loss(PAIRS, train=True)  # no key
        assert caught.value.code is ErrorCode.UNAUTHENTICATED
        with pytest.raises(DpoClientError) as caught:
            client.compute_loss([("text", [1, 2], "mixed")])
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert server.version == v0


def test_stream_losses(factory: Factory, server: ServerThread) -> None:
    v0 = server.version
    batches: list[dict[str, Any]] = [
        {"pairs": PAIRS, "train": True},
        {"pairs": PAIRS, "beta": 0.3},
        {"pairs": [([1], [], [2])]},
        {"pairs": PAIRS, "train": True},
    ]
    with factory(api_key=API_KEY) as client:
        answers = list(client.stream_losses(batches))
    assert isinstance(answers[2], DpoClientError) and answers[2].code is ErrorCode.INVALID_ARGUMENT
    first, second, _, last = answers
    assert isinstance(first, LossResult) and first.new_model_version == v0 + 1
    assert isinstance(second, LossResult) and second.model_version == v0 + 1
    assert isinstance(last, LossResult) and last.new_model_version == v0 + 2 == server.version


def test_grpc_checkpoint_writes_a_real_checkpoint(tmp_path: Path) -> None:
    with running_server(enable_http=False, checkpoint_dir=tmp_path) as srv:
        with DpoClient.grpc(srv.grpc_target, api_key=API_KEY) as client:
            client.compute_loss(PAIRS, train=True)
            out = client.checkpoint()
        assert out.model_version == srv.version == 1
        assert out.path is not None and Path(out.path).is_dir()
        assert out.weights_sha256 is not None and len(out.weights_sha256) == 64


def test_grpc_checkpoint_with_a_fake_core(server: ServerThread) -> None:
    async def fake_checkpoint() -> dict[str, str]:
        return {"path": "/ckpt/step-3"}

    server.core.checkpoint = fake_checkpoint
    try:
        with DpoClient.grpc(server.grpc_target, api_key=API_KEY) as client:
            assert client.checkpoint() == CheckpointResult(server.version, "/ckpt/step-3")
        with DpoClient.grpc(server.grpc_target) as client, pytest.raises(DpoClientError) as e:
            client.checkpoint()
        assert e.value.code is ErrorCode.UNAUTHENTICATED
    finally:
        del server.core.checkpoint


# ----------------------------------------------------------------------------- retries (real server)
def _unavailable_count(server: ServerThread, protocol: str) -> float:
    return float(
        server.core.engine.events.requests.labels(
            "compute_loss", protocol, "unavailable"
        )._value.get()
    )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retries_while_not_ready(server: ServerThread, protocol: str) -> None:
    """503 / UNAVAILABLE (Retry-After: 1) while the engine is not ready, then success."""
    engine = server.core.engine
    client = (make_http if protocol == "http" else make_grpc)(server)(retry=FAST)
    before = _unavailable_count(server, protocol)
    engine.ready = False
    timer = threading.Timer(0.3, lambda: setattr(engine, "ready", True))
    timer.start()
    try:
        started = time.monotonic()
        out = client.compute_loss(PAIRS)
        elapsed = time.monotonic() - started
    finally:
        timer.join()
        engine.ready = True
        client.close()
    assert math_ok(out.loss) and elapsed >= 0.9  # waited for Retry-After (1 s), not 10 ms
    assert _unavailable_count(server, protocol) >= before + 1


def math_ok(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retries_are_bounded(server: ServerThread, protocol: str) -> None:
    engine = server.core.engine
    make = make_http if protocol == "http" else make_grpc
    engine.ready = False
    try:
        with make(server)(retry=FAST) as client:
            started = time.monotonic()
            with pytest.raises(DpoClientError) as caught:
                client.compute_loss(PAIRS, deadline_s=0.5)  # Retry-After 1 s does not fit
            assert time.monotonic() - started < 0.5
            assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.attempts == 1
        policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
        with make(server)(retry=policy) as client, pytest.raises(DpoClientError) as caught:
            client.compute_loss(PAIRS, deadline_s=10)
        assert caught.value.attempts == 2 and caught.value.retry_after_s == 1.0
    finally:
        engine.ready = True


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_retries_when_the_queue_is_full(server: ServerThread, protocol: str) -> None:
    """max_queue=1, the worker held, one call running and one queued: the next call gets
    429 / RESOURCE_EXHAUSTED (overloaded), backs off and then succeeds."""
    engine, settings = server.core.engine, server.core.settings
    old = settings.max_queue
    settings.max_queue = 1
    overloads = engine.events.overload._value.get()
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.DpoServiceStub(ch)
        req = pb.ComputeLossRequest(
            pairs=[pb.PreferencePair(text=pb.TextTriple(prompt="a", chosen="b", rejected="c"))]
        )
        try:
            engine._executor.submit(time.sleep, 0.8)
            running = stub.ComputeLoss.future(req, timeout=30)
            time.sleep(0.2)
            queued = stub.ComputeLoss.future(req, timeout=30)
            time.sleep(0.1)
            with (make_http if protocol == "http" else make_grpc)(server)(retry=FAST) as client:
                out = client.compute_loss(PAIRS)
            running.result()
            queued.result()
        finally:
            settings.max_queue = old
    assert math_ok(out.loss) and engine.events.overload._value.get() >= overloads + 1


# ----------------------------------------------------------------------------- retries (scripted faults)
def test_http_retries_429_and_503_honouring_retry_after(
    fake: Any, real_body: dict[str, Any]
) -> None:
    f = fake([
        (429, {"code": "overloaded", "detail": "queue full", "errors": []}, {"Retry-After": "0"}, 0.0),
        (503, {"code": "unavailable", "detail": "loading", "errors": []}, {"Retry-After": "1"}, 0.0),
        (200, real_body, {}, 0.0),
    ])  # fmt: skip
    with DpoClient.http(f.url, api_key="k", retry=FAST) as client:
        started = time.monotonic()
        out = client.compute_loss(PAIRS[2:], train=True)
        elapsed = time.monotonic() - started
    assert out == LossResult.from_dict(real_body)
    assert len(f.bodies) == 3 and elapsed >= 1.0
    ids = {b["request_id"] for b in f.bodies}
    assert len(ids) == 1 and None not in ids  # one auto id, the same on every retry


@pytest.mark.parametrize("status", [400, 401, 409, 413, 422, 500, 504])
def test_no_retry_on_other_errors(fake: Any, status: int) -> None:
    body = {
        "code": "invalid_argument",
        "detail": "pairs[0].chosen: bad",
        "errors": [{"field": "pairs[0].chosen", "message": "bad"}],
    }
    if status != 422:
        body = {"detail": "nope"}
    f = fake([(status, body, {"Retry-After": "0"}, 0.0)])
    with DpoClient.http(f.url, retry=FAST) as client, pytest.raises(DpoClientError) as caught:
        client.compute_loss(PAIRS)
    assert len(f.bodies) == 1 and caught.value.attempts == 1 and caught.value.status == status
    if status == 422:
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT
        assert caught.value.errors == [("pairs[0].chosen", "bad")]


def test_http_deadline(fake: Any, real_body: dict[str, Any]) -> None:
    f = fake([(200, real_body, {}, 2.0)])
    with DpoClient.http(f.url, retry=FAST) as client:
        started = time.monotonic()
        with pytest.raises(DpoClientError) as caught:
            client.compute_loss(PAIRS, deadline_s=0.3)
    assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED and time.monotonic() - started < 1.5


def test_grpc_deadline(server: ServerThread) -> None:
    server.core.engine._executor.submit(time.sleep, 1.0)
    with DpoClient.grpc(server.grpc_target, retry=FAST) as client:
        started = time.monotonic()
        with pytest.raises(DpoClientError) as caught:
            client.compute_loss(PAIRS, deadline_s=0.3)
        elapsed = time.monotonic() - started
    assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED and elapsed < 0.9
    assert caught.value.status == "DEADLINE_EXCEEDED"
    time.sleep(0.8)  # let the worker go before the next test


def test_connection_refused_is_retried_then_unavailable() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for client in (
        DpoClient.http(f"http://127.0.0.1:{port}", retry=policy),
        DpoClient.grpc(f"127.0.0.1:{port}", retry=policy),
    ):
        with client, pytest.raises(DpoClientError) as caught:
            client.compute_loss(PAIRS, deadline_s=5)
        assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.attempts == 3


def test_http_checkpoint_and_model_info_from_a_fake(fake: Any) -> None:
    f = fake([(200, {"model_version": 4, "path": "/ckpt/4"}, {}, 0.0)])
    with DpoClient.http(f.url, api_key="k") as client:
        assert client.checkpoint() == CheckpointResult(4, "/ckpt/4")
