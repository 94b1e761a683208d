"""Hostile HTTP clients against a real server (issue 10, round 2): idempotency keys, abandoned
requests, huge bodies, slow and oversized clients, invalid Unicode, the error shape of every
rejection, strict types, duplicate keys, and metrics that agree with what clients saw.

The gRPC side of each class is in ``test_hostile_grpc.py``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ServerThread, running_server
from hostile_support import (
    AUTH,
    HEAVY,
    IDS,
    TEXT,
    busy_worker,
    connect,
    is_error_shape,
    metric,
    metrics,
    post_bytes,
    queued,
    raw_request,
    read_response,
    requests_total,
    wait_until,
)

LIMITS = {
    "max_header_bytes": 8192,
    "header_timeout_s": 1.0,
    "body_timeout_s": 1.5,
    "max_connections": 32,
}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    with running_server(enable_grpc=False, **LIMITS) as server:
        yield server


def _client(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.http_url, timeout=60)


def _train(c: httpx.Client, pairs: list[dict[str, object]], **extra: object) -> httpx.Response:
    headers = {**AUTH, **extra.pop("headers", {})}  # type: ignore[dict-item]
    return c.post("/dpo/loss", json={"pairs": pairs, "train": True, **extra}, headers=headers)


# ------------------------------------------------------------------------ 1. idempotency keys
def test_a_tracing_header_is_not_an_idempotency_key(srv: ServerThread) -> None:
    """Three different batches with one X-Request-ID: three steps, each acknowledged."""
    v0 = srv.version
    with _client(srv) as c:
        answers = [
            _train(c, [{**TEXT[0], "chosen": f" {n}"}], headers={"X-Request-ID": "trace-1"})
            for n in (4, 5, 6)
        ]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.json()["new_model_version"] for r in answers] == [v0 + 1, v0 + 2, v0 + 3]
    assert all(r.json()["trained"] for r in answers)
    assert all(r.headers["x-request-id"] == "trace-1" for r in answers)
    assert srv.version == v0 + 3


def test_a_request_id_reused_for_another_request_is_409(srv: ServerThread) -> None:
    with _client(srv) as c:
        first = _train(c, TEXT, request_id="reuse-1")
        assert first.status_code == 200, first.text
        v1 = srv.version
        steps = metric(metrics(srv), "dpo_optimizer_steps_total")
        retry = _train(c, TEXT, request_id="reuse-1")
        other_pairs = _train(c, IDS, request_id="reuse-1")
        other_beta = _train(c, TEXT, request_id="reuse-1", beta=0.2)
        assert metric(metrics(srv), "dpo_optimizer_steps_total") == steps
    assert retry.status_code == 200 and retry.json() == first.json()
    for conflict in (other_pairs, other_beta):
        assert conflict.status_code == 409, conflict.text
        body = conflict.json()
        assert is_error_shape(body) and body["code"] == "conflict"
        assert "reuse-1" in body["detail"] and "different" in body["detail"]
    assert srv.version == v1


# ------------------------------------------------------------------------ 6. disconnects
@pytest.mark.slow
def test_work_of_disconnected_clients_is_dropped_before_the_model(srv: ServerThread) -> None:
    """20 heavy requests queued behind a busy worker, then their clients hang up: none is
    computed, all are counted cancelled (requests and drops), and a small request behind
    them is answered at once."""
    before = metrics(srv)
    body = httpx.Request("POST", "/", json={"pairs": HEAVY}).content
    with busy_worker(srv):
        socks = [connect(srv) for _ in range(10)] + [connect(srv) for _ in range(10)]
        for sock in socks:
            sock.sendall(post_bytes("/dpo/loss", body))
        wait_until(lambda: queued(srv) >= 20, what="20 queued requests")
        for sock in socks:
            sock.close()
        wait_until(
            lambda: (
                requests_total(metrics(srv), "compute_loss", "http", "cancelled")
                >= requests_total(before, "compute_loss", "http", "cancelled") + 20
            ),
            what="20 cancelled requests",
        )
    started = time.monotonic()
    with _client(srv) as c:
        small = c.post("/dpo/loss", json={"pairs": TEXT})
    waited = time.monotonic() - started
    after = metrics(srv)
    assert small.status_code == 200 and waited < 5.0, waited
    delta = {
        code: requests_total(after, "compute_loss", "http", code)
        - requests_total(before, "compute_loss", "http", code)
        for code in ("ok", "cancelled")
    }
    assert delta == {"ok": 1, "cancelled": 20}
    dropped = metric(after, "dpo_dropped_requests_total", reason="cancelled") - metric(
        before, "dpo_dropped_requests_total", reason="cancelled"
    )
    assert dropped == 20
    assert metric(after, "dpo_dropped_requests_total", reason="deadline") == metric(
        before, "dpo_dropped_requests_total", reason="deadline"
    )
    tokens = metric(after, "dpo_tokens_total") - metric(before, "dpo_tokens_total")
    assert tokens == small.json()["num_tokens"]  # no token of the abandoned work was counted


# ------------------------------------------------------------------------ 7. huge bodies
@pytest.mark.slow
def test_huge_id_lists_are_refused_off_the_event_loop(srv: ServerThread) -> None:
    """Four ~8 MB bodies of ~4M token ids at once: each 422 naming the limit, while
    /health/live keeps answering quickly (parsing and validation run off the event loop)."""
    ids = ",".join(["7"] * 3_900_000)
    body = f'{{"pairs":[{{"prompt_ids":[{ids}],"chosen_ids":[1],"rejected_ids":[2]}}]}}'.encode()
    assert len(body) < srv.settings.max_body_bytes
    done = threading.Event()
    latencies: list[float] = []

    def probe() -> None:
        with _client(srv) as c:
            while not done.is_set() or not latencies:
                started = time.monotonic()
                assert c.get("/health/live").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    def post(_: int) -> httpx.Response:
        with _client(srv) as c:
            return c.post("/dpo/loss", content=body, headers={"Content-Type": "application/json"})

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, range(4)))
    finally:
        done.set()
        prober.join(30)
    for r in answers:
        assert r.status_code == 422, r.text[:200]
        assert r.json()["errors"][0]["field"].startswith("pairs")
        assert "more than the limit" in r.json()["detail"]
    print(f"/health/live under load: n={len(latencies)} max={max(latencies):.3f}s")
    # every probe answered, none stalled (how many fit in depends on how fast the load went)
    assert latencies and max(latencies) < 1.0, max(latencies)


# ------------------------------------------------------------------------ 8. slow and big
def test_oversized_headers_are_431(srv: ServerThread) -> None:
    big = "x" * 64 * 1024
    for request in (
        f"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n".encode(),
        f"GET /health/live?{big} HTTP/1.1\r\nHost: t\r\n\r\n".encode(),
        b"GET /health/live HTTP/1.1\r\nHost: t\r\n" + b"".join(
            f"X-H{i}: {'y' * 100}\r\n".encode() for i in range(200)
        ) + b"\r\n",
    ):  # fmt: skip
        answer = raw_request(srv, request)
        assert answer is not None and answer.status == 431
        assert is_error_shape(answer.json()) and answer.json()["code"] == "too_large"
        assert answer.closed


def test_a_header_that_never_ends_is_not_buffered(srv: ServerThread) -> None:
    """A header streamed without end is refused once it passes the limit (431), long
    before it could grow to 64 MB."""
    with connect(srv) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Big: ")
        sent = 0
        with pytest.raises(OSError):  # the server closes; writing then fails
            while sent < 64 * 1024 * 1024:
                sock.sendall(b"z" * 65536)
                sent += 65536
        print(f"sent {sent} bytes before the server closed")
        assert sent < 4 * 1024 * 1024


def test_slow_headers_and_silent_connections_get_408(srv: ServerThread) -> None:
    started = time.monotonic()
    with connect(srv) as silent, connect(srv) as slow:
        slow.sendall(b"POST /dpo/loss HTTP/1.1\r\nHost: t\r\n")
        answers = [read_response(silent), read_response(slow)]
    assert time.monotonic() - started < 1.0 + 3.0
    for answer in answers:
        assert answer is not None and answer.status == 408 and answer.closed
        assert is_error_shape(answer.json()) and answer.json()["code"] == "request_timeout"


@pytest.mark.slow
def test_trickled_bodies_are_cut_off_with_408(srv: ServerThread) -> None:
    """Five connections sending a body byte every 0.3 s: all answered 408 and closed within
    the body timeout (+ slack), and counted."""
    before = metrics(srv)
    socks = [connect(srv) for _ in range(5)]
    head = post_bytes("/dpo/loss", b"", {"Content-Length": "1000"})
    for sock in socks:
        sock.sendall(head)
    started = time.monotonic()
    open_socks = list(socks)
    while open_socks and time.monotonic() - started < 6.0:
        for sock in list(open_socks):
            try:
                sock.sendall(b"{")
            except OSError:
                open_socks.remove(sock)
        time.sleep(0.3)
    answers = [read_response(s, timeout=5) for s in socks]
    for sock in socks:
        sock.close()
    assert time.monotonic() - started < 1.5 + 3.0
    for answer in answers:
        assert answer is not None and answer.status == 408 and answer.closed
        assert is_error_shape(answer.json())
    after = metrics(srv)
    counted = requests_total(after, "compute_loss", "http", "request_timeout") - requests_total(
        before, "compute_loss", "http", "request_timeout"
    )
    assert counted == 5


def test_a_chunked_body_over_the_limit_is_413_in_the_service_shape(srv: ServerThread) -> None:
    limit = srv.settings.max_body_bytes
    chunk = b"x" * 65536
    with connect(srv) as sock:
        sock.sendall(
            b"POST /dpo/loss HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(limit // len(chunk) + 2):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass  # the server answered and closed: the rest is not read
        answer = read_response(sock)
    assert answer is not None and answer.status == 413
    assert answer.json()["code"] == "too_large" and is_error_shape(answer.json())
    declared = raw_request(srv, post_bytes("/dpo/loss", b"", {"Content-Length": str(limit + 1)}))
    assert declared is not None and declared.status == 413 and is_error_shape(declared.json())


def test_connections_over_the_limit_are_refused_503(srv: ServerThread) -> None:
    cap = LIMITS["max_connections"]
    held = [connect(srv) for _ in range(int(cap))]
    try:
        time.sleep(0.1)
        extra = raw_request(srv, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
    finally:
        for sock in held:
            sock.close()
    assert extra is not None and extra.status == 503 and extra.closed
    assert is_error_shape(extra.json()) and extra.headers["retry-after"] == "1"
    wait_until(
        lambda: httpx.get(f"{srv.http_url}/health/live").status_code == 200,
        what="a free connection",
    )


# ------------------------------------------------------------------------ 9. invalid Unicode
def test_text_that_is_not_valid_unicode_is_422(srv: ServerThread) -> None:
    v0 = srv.version
    with _client(srv) as c:
        for raw in (
            b'{"pairs":[{"prompt":"a\\ud800b","chosen":" x","rejected":" y"}]}',
            b'{"pairs":[{"prompt":"a","chosen":" \\udfff","rejected":" y"}],"train":true}',
            b'{"pairs":[{"prompt":"a\xff\xfe","chosen":" x","rejected":" y"}]}',
        ):
            r = c.post("/dpo/loss", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text
            assert is_error_shape(r.json()) and r.json()["code"] == "invalid_argument"
        ok = c.post("/dpo/loss", json={"pairs": TEXT})  # same connection: still usable
    assert ok.status_code == 200 and srv.version == v0


# ------------------------------------------------------------------------ 11. error shape
def test_every_framework_error_has_the_service_shape(srv: ServerThread) -> None:
    json_headers = {"Content-Type": "application/json"}
    with _client(srv) as c:
        cases = {
            404: c.get("/no/such/path"),
            405: c.get("/dpo/loss"),
            415: c.post("/dpo/loss", content=b"pairs=1", headers={"Content-Type": "text/plain"}),
            422: c.post("/dpo/loss", content=b'{"pairs": [', headers=json_headers),
        }
        gzip = c.post(
            "/dpo/loss", content=b"\x1f\x8b", headers={**json_headers, "Content-Encoding": "gzip"}
        )
        form = c.post("/dpo/loss", data={"pairs": "x"})
        latin = c.post(
            "/dpo/loss",
            content=b"{}",
            headers={"Content-Type": "application/json; charset=latin-1"},
        )
        empty = c.post("/dpo/loss", content=b"", headers=json_headers)
    for status, r in cases.items():
        assert r.status_code == status, (status, r.text)
        assert is_error_shape(r.json()), r.text
        assert r.headers["x-request-id"]
    assert cases[404].json()["code"] == "not_found"
    assert (
        cases[405].json()["code"] == "method_not_allowed" and "POST" in cases[405].headers["allow"]
    )
    for r in (gzip, form, latin):
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", r.text
    assert empty.status_code == 422 and is_error_shape(empty.json())
    malformed = raw_request(srv, b"NOT HTTP AT ALL\r\n\r\n")
    assert malformed is not None and malformed.status == 400 and is_error_shape(malformed.json())


# ------------------------------------------------------------------------ 12. strict types
def test_wrong_json_types_are_refused_not_coerced(srv: ServerThread) -> None:
    v0 = srv.version
    cases = {
        "train": ["true", 1, "yes", 0],
        "expected_version": ["0", True, 0.0, "1"],
    }
    with _client(srv) as c:
        for name, values in cases.items():
            for value in values:
                extra = {"train": True} if name == "expected_version" else {}
                r = c.post("/dpo/loss", json={"pairs": TEXT, **extra, name: value}, headers=AUTH)
                assert r.status_code == 422, (name, value, r.text)
                assert [e["field"] for e in r.json()["errors"]] == [name], r.text
        gamma = c.post("/dpo/loss", json={"pairs": TEXT, "loss_type": "simpo", "simpo_gamma": -1})
    assert gamma.status_code == 422
    assert gamma.json()["errors"][0]["field"] == "simpo_gamma", gamma.text
    assert srv.version == v0


def test_two_authorization_headers_are_401(srv: ServerThread) -> None:
    v0 = srv.version
    key = AUTH["Authorization"]
    with _client(srv) as c:
        for pair in ([key, key], [key, "Bearer wrong"], ["Bearer wrong", key]):
            headers = [("Authorization", v) for v in pair]
            r = c.post("/dpo/loss", json={"pairs": TEXT, "train": True}, headers=headers)
            assert r.status_code == 401 and is_error_shape(r.json()), r.text
            admin = c.post("/admin/checkpoint", headers=headers)
            assert admin.status_code == 401
    assert srv.version == v0


# ------------------------------------------------------------------------ 13. metrics
def test_rejections_outside_the_endpoints_are_counted(srv: ServerThread) -> None:
    before = metrics(srv)
    with _client(srv) as c:
        c.get("/no/such/path")
        c.post("/dpo/loss", content=b"x", headers={"Content-Type": "text/plain"})
        c.post("/dpo/loss", content=b"{", headers={"Content-Type": "application/json"})
        c.post("/admin/checkpoint", headers={"Authorization": "Bearer wrong"})
    raw_request(srv, post_bytes("/dpo/loss", b"", {"Content-Length": str(10**9)}))
    raw_request(srv, b"GET / HTTP/1.1\r\nX: " + b"x" * 20000 + b"\r\n\r\n")
    after = metrics(srv)
    expected = [
        ("unknown", "not_found"),
        ("compute_loss", "unsupported_media_type"),
        ("compute_loss", "invalid_argument"),
        ("checkpoint", "unauthenticated"),
        ("compute_loss", "too_large"),
        ("connection", "too_large"),
    ]
    for endpoint, code in expected:
        delta = requests_total(after, endpoint, "http", code) - requests_total(
            before, endpoint, "http", code
        )
        assert delta == 1, (endpoint, code, delta)


PROBED = ("path=/health/live ", "path=/metrics ", "path=/no/such/path ")


def test_probes_log_at_debug_and_uvicorn_access_log_is_off(
    srv: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with _client(srv) as c:
        c.get("/health/live")
        c.get("/metrics")
        c.get("/no/such/path")
    # each line is logged once its response is sent: wait (bounded) until all three are in
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline:
        lines = [r for r in caplog.records if "http_request" in r.getMessage()]
        if sum(p in r.getMessage() for r in lines for p in PROBED) >= 3:
            break
        time.sleep(0.02)
    probe = [r for r in lines if "path=/health/live" in r.getMessage()]
    scrape = [r for r in lines if "path=/metrics" in r.getMessage()]
    missing = [r for r in lines if "path=/no/such/path" in r.getMessage()]
    assert len(probe) == len(scrape) == len(missing) == 1
    assert probe[0].levelno == scrape[0].levelno == logging.DEBUG
    assert missing[0].levelno == logging.INFO and "status=404" in missing[0].getMessage()
    assert "client=127.0.0.1:" in probe[0].getMessage()
    assert not [r for r in caplog.records if r.name == "uvicorn.access"]


# ------------------------------------------------------------------------ a keyed-loss server
@pytest.mark.slow
def test_with_require_key_for_loss_the_key_comes_before_the_body() -> None:
    """401 for every unauthenticated loss call, whatever its body (bad JSON, bad types,
    oversized), before anything is read or validated."""
    with running_server(enable_grpc=False, require_key_for_loss=True) as server:
        with _client(server) as c:
            bodies = [b"{", b'{"pairs": []}', b'{"pairs": [{"prompt": 1}], "train": "yes"}']
            for raw in bodies:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    r = c.post(
                        "/dpo/loss",
                        content=raw,
                        headers={"Content-Type": "application/json", **headers},
                    )
                    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
            keyed = c.post("/dpo/loss", content=b"{", headers={**AUTH})
            assert keyed.status_code == 422
        big = post_bytes("/dpo/loss", b"", {"Content-Length": str(10**9)})
        answer = raw_request(server, big)
        assert answer is not None and answer.status == 401 and answer.closed


@pytest.mark.slow
def test_a_server_deadline_drop_is_labelled_deadline() -> None:
    with running_server(enable_grpc=False, request_timeout_s=0.5) as server:
        before = metrics(server)
        with busy_worker(server), ThreadPoolExecutor(3) as pool:
            answers = list(
                pool.map(
                    lambda _: httpx.post(
                        f"{server.http_url}/dpo/loss", json={"pairs": TEXT}, timeout=30
                    ),
                    range(3),
                )
            )
        wait_until(lambda: server.core.engine.pending() == 0, what="an empty queue")
        after = metrics(server)
    assert [r.status_code for r in answers] == [504, 504, 504]
    for reason, expected in (("deadline", 3), ("cancelled", 0)):
        delta = metric(after, "dpo_dropped_requests_total", reason=reason) - metric(
            before, "dpo_dropped_requests_total", reason=reason
        )
        assert delta == expected, (reason, delta)
    code = requests_total(after, "compute_loss", "http", "deadline_exceeded")
    assert code - requests_total(before, "compute_loss", "http", "deadline_exceeded") == 3
