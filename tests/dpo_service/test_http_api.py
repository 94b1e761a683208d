"""REST API against a real uvicorn server on loopback, driven by httpx."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from conftest import API_KEY, ServerThread, running_server
from modern_llm.alignment.dpo_loss import dpo_loss
from modern_llm.alignment.logprobs import LogpStrategy, PairTokens, pair_logps
from modern_llm.tokenizer import ByteTokenizer

TEXT_PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five, probably"},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
    {"prompt": "", "chosen": "éè ünïcode", "rejected": "ascii"},
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """HTTP only: these tests need no gRPC listener."""
    with running_server(enable_grpc=False) as srv:
        yield srv


def _client(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.http_url, timeout=60)


def test_health_and_model_info(server: ServerThread) -> None:
    with _client(server) as c:
        assert c.get("/health/live").json() == {"status": "live"}
        ready = c.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        info = c.get("/v1/model").json()
    assert info["vocab_size"] == 259
    assert info["max_seq_len"] == 256
    assert info["parameters"] == sum(
        p.numel() for p in server.core.engine.bundle.model.parameters()
    )
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["model_version"] == server.version


def test_numbers_equal_the_library_on_the_same_model(server: ServerThread) -> None:
    """The service's loss is the seed's ``dpo_loss`` over log-probs the library computes
    directly (two-row layout, no sharing) on the very model the server holds."""
    with _client(server) as c:
        r = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS, "beta": 0.25})
    assert r.status_code == 200, r.text
    body = r.json()
    tok = ByteTokenizer()
    pairs = [
        PairTokens(
            tok.encode(p["prompt"], add_bos=True),
            tok.encode(p["chosen"], add_eos=True),
            tok.encode(p["rejected"], add_eos=True),
        )
        for p in TEXT_PAIRS
    ]
    model = server.core.engine.bundle.model
    with torch.inference_mode():
        ref = pair_logps(model, pairs, strategy=LogpStrategy.TWO_ROWS, pad_id=tok.pad_id)
        expected = dpo_loss(ref.chosen, ref.rejected, beta=0.25)
    assert body["chosen_logps"] == pytest.approx(ref.chosen.tolist(), abs=1e-4)
    assert body["rejected_logps"] == pytest.approx(ref.rejected.tolist(), abs=1e-4)
    assert body["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert body["loss"] == pytest.approx(sum(body["losses"]) / 3, abs=1e-6)
    assert body["chosen_tokens"] == [len(p.chosen) for p in pairs]
    assert body["rejected_tokens"] == [len(p.rejected) for p in pairs]
    assert body["rewards_chosen"] == pytest.approx(
        [0.25 * x for x in body["chosen_logps"]], rel=1e-6
    )
    margins = [a - b for a, b in zip(body["rewards_chosen"], body["rewards_rejected"], strict=True)]
    assert body["margins"] == pytest.approx(margins, abs=1e-6)
    assert body["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert body["model_version"] == server.version
    assert body["trained"] is False and body["grad_norm"] is None


def test_provided_reference_logps_are_used(server: ServerThread) -> None:
    """With reference log-probs, rewards are β·(π − ρ) and the loss is −logσ(margin)."""
    pairs = [{**TEXT_PAIRS[0], "reference_chosen_logp": -10.0, "reference_rejected_logp": -12.5}]
    with _client(server) as c:
        body = c.post("/dpo/loss", json={"pairs": pairs, "beta": 0.5}).json()
    pc, pr = body["chosen_logps"][0], body["rejected_logps"][0]
    margin = 0.5 * ((pc + 10.0) - (pr + 12.5))
    assert body["margins"][0] == pytest.approx(margin, abs=1e-4)
    assert body["loss"] == pytest.approx(math.log1p(math.exp(-margin)), abs=1e-5)
    assert body["reference_chosen_logps"] == [-10.0]


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty pairs", {"pairs": []}, "pairs"),
    ("missing pairs", {}, "pairs"),
    (
        "empty response",
        {"pairs": [{"prompt": "a", "chosen": "", "rejected": "b"}]},
        "pairs[0].chosen",
    ),
    (
        "empty ids",
        {"pairs": [{"prompt_ids": [256], "chosen_ids": [1], "rejected_ids": []}]},
        "pairs[0].rejected_ids",
    ),
    (
        "empty prompt ids",
        {"pairs": [{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}]},
        "pairs[0].prompt_ids",
    ),
    ("non-string", {"pairs": [{"prompt": "a", "chosen": 3, "rejected": "b"}]}, "pairs[0].chosen"),
    (
        "float ids",
        {"pairs": [{"prompt_ids": [1.5], "chosen_ids": [1], "rejected_ids": [2]}]},
        "pairs[0].prompt_ids[0]",
    ),
    (
        "id outside vocab",
        {
            "pairs": [
                TEXT_PAIRS[0],
                {"prompt_ids": [256], "chosen_ids": [1, 259], "rejected_ids": [2]},
            ]
        },
        "pairs[1].chosen_ids[1]",
    ),
    (
        "negative id",
        {"pairs": [{"prompt_ids": [256], "chosen_ids": [-1], "rejected_ids": [2]}]},
        "pairs[0].chosen_ids[0]",
    ),
    (
        "too long",
        {"pairs": [{"prompt": "x" * 250, "chosen": "y" * 10, "rejected": "z"}]},
        "pairs[0].chosen",
    ),
    ("beta zero", {"pairs": TEXT_PAIRS, "beta": 0}, "beta"),
    ("beta negative", {"pairs": TEXT_PAIRS, "beta": -1}, "beta"),
    ("beta string", {"pairs": TEXT_PAIRS, "beta": "big"}, "beta"),
    ("unknown loss", {"pairs": TEXT_PAIRS, "loss_type": "magic"}, "loss_type"),
    ("label smoothing", {"pairs": TEXT_PAIRS, "label_smoothing": 0.7}, "label_smoothing"),
    (
        "partial reference",
        {
            "pairs": [
                {**TEXT_PAIRS[0], "reference_chosen_logp": -1.0, "reference_rejected_logp": -2.0},
                TEXT_PAIRS[1],
            ]
        },
        "pairs[1].reference_chosen_logp",
    ),
    (
        "half reference",
        {"pairs": [{**TEXT_PAIRS[0], "reference_chosen_logp": -1.0}]},
        "pairs[0].reference_rejected_logp",
    ),
    (
        "mixed pair kinds",
        {"pairs": [{"prompt": "a", "chosen_ids": [1], "rejected": "b"}]},
        "pairs[0]",
    ),
    ("unknown field", {"pairs": TEXT_PAIRS, "bogus": 1}, "bogus"),
    ("frozen without copy", {"pairs": TEXT_PAIRS, "reference": "frozen"}, "reference"),
    ("pairs not a list", {"pairs": "abc"}, "pairs"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_422_naming_the_field(
    server: ServerThread, case: str, body: dict[str, Any], field: str
) -> None:
    before = server.version
    with _client(server) as c:
        r = c.post(
            "/dpo/loss",
            json={**body, "train": True},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert r.status_code == 422, (case, r.text)
    err = r.json()
    assert err["code"] == "invalid_argument"
    assert any(e["field"].startswith(field) for e in err["errors"]), err
    assert server.version == before


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[]",
        b'{"pairs": [], "beta": NaN}',
        b'{"pairs":[{"prompt":"a","chosen":"b","rejected":"c"}],"beta":Infinity}',
    ],
)
def test_malformed_json_and_non_finite_beta_get_422(server: ServerThread, raw: bytes) -> None:
    with _client(server) as c:
        r = c.post("/dpo/loss", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_train_needs_the_key(server: ServerThread) -> None:
    before = server.version
    with _client(server) as c:
        no_key = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS, "train": True})
        bad_key = c.post(
            "/dpo/loss",
            json={"pairs": TEXT_PAIRS, "train": True},
            headers={"Authorization": "Bearer nope"},
        )
        loss_only = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS})
    assert no_key.status_code == 401 and bad_key.status_code == 401
    assert loss_only.status_code == 200
    assert server.version == before


def test_train_step_returns_loss_before_the_step_and_bumps_version(
    server: ServerThread, auth: dict[str, str]
) -> None:
    with _client(server) as c:
        before = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS}).json()
        trained = c.post(
            "/dpo/loss", json={"pairs": TEXT_PAIRS, "train": True}, headers=auth
        ).json()
        after = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS}).json()
    assert trained["trained"] is True
    assert trained["loss"] == pytest.approx(before["loss"], abs=1e-5)
    assert trained["new_model_version"] == trained["model_version"] + 1 == after["model_version"]
    assert trained["grad_norm"] > 0
    assert after["loss"] != pytest.approx(before["loss"], abs=1e-7)


def test_online_training_learns() -> None:
    """Repeated train requests on a fixed preference set raise its margins and accuracy and
    lower its loss; the version grows by exactly one per acknowledged train request."""
    pairs = [
        {
            "prompt": f"Question {i}: is the sky blue?",
            "chosen": " Yes, it is blue.",
            "rejected": f" No{'!' * i} green.",
        }
        for i in range(6)
    ]
    with running_server(enable_grpc=False, lr=3e-3) as srv, _client(srv) as c:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        start = c.post("/dpo/loss", json={"pairs": pairs, "beta": 0.1}).json()
        for _ in range(12):
            r = c.post("/dpo/loss", json={"pairs": pairs, "beta": 0.1, "train": True}, headers=auth)
            assert r.status_code == 200, r.text
        end = c.post("/dpo/loss", json={"pairs": pairs, "beta": 0.1}).json()
    assert end["model_version"] == start["model_version"] + 12
    assert end["loss"] < start["loss"] - 0.1
    assert sum(end["margins"]) > sum(start["margins"])
    assert end["accuracy"] == 1.0 and end["accuracy"] >= start["accuracy"]


def test_version_counts_train_requests_under_concurrency(
    server: ServerThread, auth: dict[str, str]
) -> None:
    """Concurrent train and loss-only requests: each acknowledged train request adds exactly one
    to the version, and every returned version is unique among train responses."""
    before = server.version

    def call(i: int) -> dict[str, Any]:
        train = i % 3 == 0
        with _client(server) as c:
            r = c.post(
                "/dpo/loss",
                json={"pairs": TEXT_PAIRS[: 1 + i % 3], "train": train},
                headers=auth if train else {},
            )
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(24)))
    trains = [r for r in results if r["trained"]]
    assert len(trains) == 8
    assert server.version == before + 8
    assert sorted(r["new_model_version"] for r in trains) == list(range(before + 1, before + 9))


def test_request_id_is_echoed(server: ServerThread) -> None:
    """X-Request-ID is a tracing id: echoed in the header, never adopted as the body's
    request_id (the idempotency key); a body request_id is echoed in both."""
    with _client(server) as c:
        r = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS[:1]}, headers={"X-Request-ID": "abc-123"})
        body_id = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS[:1], "request_id": "b-1"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["request_id"] not in (None, "abc-123")
    assert body_id.json()["request_id"] == body_id.headers["x-request-id"] == "b-1"


def test_metrics_endpoint(server: ServerThread, auth: dict[str, str]) -> None:
    """Every metric the service promises is exposed, and the gauges settle after the calls."""
    with _client(server) as c:
        c.post("/dpo/loss", json={"pairs": TEXT_PAIRS[:1]})
        c.post("/dpo/loss", json={"pairs": TEXT_PAIRS[:1], "train": True}, headers=auth)
        text = c.get("/metrics").text
    assert 'dpo_requests_total{code="ok",endpoint="compute_loss",protocol="http"}' in text
    for name in (
        "dpo_request_latency_seconds_bucket",
        "dpo_queue_time_seconds_bucket",
        "dpo_batch_requests_bucket",
        "dpo_batch_pairs_bucket",
        "dpo_tokens_total",
        "dpo_optimizer_steps_total",
        "dpo_rejected_steps_total",
        "dpo_last_train_loss",
    ):
        assert name in text, name
    assert "dpo_in_flight 0.0" in text
    assert "dpo_queue_depth 0.0" in text
    assert f"dpo_model_version {float(server.version)}" in text


def test_body_too_large_gets_413() -> None:
    with running_server(enable_grpc=False, max_body_bytes=2000) as srv, _client(srv) as c:
        r = c.post(
            "/dpo/loss", json={"pairs": [{"prompt": "x" * 3000, "chosen": "a", "rejected": "b"}]}
        )
        assert r.status_code == 413
        assert r.json()["code"] == "too_large"


def test_overflowing_beta_is_refused_and_applies_nothing(
    server: ServerThread, auth: dict[str, str]
) -> None:
    """β = 3e38 is finite, but β·logp overflows float32 (|logp| ≈ 10..100): the rewards would be
    ±inf. Loss-only and train requests both get 422, and no step is applied."""
    before = server.version
    with _client(server) as c:
        for train in (False, True):
            r = c.post(
                "/dpo/loss",
                json={"pairs": TEXT_PAIRS, "beta": 3e38, "train": train},
                headers=auth,
            )
            assert r.status_code == 422, r.text
            assert "finite" in r.json()["detail"]
    assert server.version == before
