"""Exactly-once training: request_id idempotency, expected_version, non-finite steps, admin
checkpoints, restart, and a real server killed with SIGKILL mid-stream."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from conftest import ServerThread, running_server, small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.engine.preparation import prepare
from dpo_service.engine.results import LossResult
from dpo_service.errors import ServiceError
from dpo_service.schemas import LossRequest
from dpo_service.state.files import weights_digest
from dpo_service.state.format import LATEST_FILE
from modern_llm.alignment.logprobs import LogpStrategy, PairTokens, pair_logps
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM
from modern_llm.tokenizer import ByteTokenizer
from server_process import AUTH, ServerProcess

pytestmark = pytest.mark.timeout(180)

PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    ckpt = tmp_path_factory.mktemp("ckpt")
    with running_server(enable_grpc=False, checkpoint_dir=ckpt, checkpoint_every=3) as srv:
        yield srv


def _train(c: httpx.Client, **extra: Any) -> httpx.Response:
    return c.post("/dpo/loss", json={"pairs": PAIRS, "train": True, **extra}, headers=AUTH)


def _digest(server: ServerThread) -> str:
    return weights_digest(server.core.engine.bundle.model.state_dict())


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_retry_with_the_same_request_id_applies_nothing(server: ServerThread) -> None:
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        first = _train(c, request_id="idem-1")
        assert first.status_code == 200, first.text
        version, digest = server.version, _digest(server)
        steps = _metric(c, "dpo_optimizer_steps_total")
        again = _train(c, request_id="idem-1")
        assert _metric(c, "dpo_optimizer_steps_total") == steps
        assert server.version == version and _digest(server) == digest
        # X-Request-ID is a tracing id, not an idempotency key: this is a new step
        header_id = c.post(
            "/dpo/loss",
            json={"pairs": PAIRS, "train": True},
            headers={**AUTH, "X-Request-ID": "idem-1"},
        )
        assert _metric(c, "dpo_optimizer_steps_total") == steps + 1
    assert again.status_code == header_id.status_code == 200
    assert again.json() == first.json()
    assert first.json()["new_model_version"] == version
    assert header_id.json()["new_model_version"] == version + 1
    assert header_id.json()["request_id"] != "idem-1"


def test_stale_expected_version_is_409_and_applies_nothing(server: ServerThread) -> None:
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        version, digest = server.version, _digest(server)
        for stale in (version - 1, version + 1):
            r = _train(c, expected_version=stale)
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "conflict"
            assert f"model is at version {version}" in r.json()["detail"]
        assert server.version == version and _digest(server) == digest
        ok = _train(c, expected_version=version, request_id="ev-1")
        assert ok.status_code == 200 and ok.json()["new_model_version"] == version + 1
        # a retry of an applied step is answered from the record even though its
        # expected_version is now stale
        again = _train(c, expected_version=version, request_id="ev-1")
    assert again.status_code == 200 and again.json() == ok.json()
    assert server.version == version + 1


def test_non_finite_step_is_rejected_and_counted(server: ServerThread) -> None:
    """β = 1e20 with reference log-probs of ±1e20 overflows float32: the loss is inf."""
    pairs = [{**PAIRS[0], "reference_chosen_logp": 1e20, "reference_rejected_logp": -1e20}]
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        version, digest = server.version, _digest(server)
        rejected = _metric(c, "dpo_rejected_steps_total")
        r = c.post(
            "/dpo/loss",
            json={"pairs": pairs, "beta": 1e20, "train": True, "request_id": "nf-1"},
            headers=AUTH,
        )
        assert r.status_code == 422, r.text
        assert "non-finite" in r.json()["detail"] and "not applied" in r.json()["detail"]
        assert _metric(c, "dpo_rejected_steps_total") == rejected + 1
    assert server.version == version and _digest(server) == digest
    assert "nf-1" not in server.core.engine.state.completed


def test_nan_forward_leaves_weights_and_optimizer_bit_identical() -> None:
    """A fault no input can cause (the model returns NaN) applies nothing at all."""
    engine = make_engine(small_settings(enable_grpc=False))
    engine.load()
    assert engine.bundle is not None and engine.state is not None
    model, optimizer = engine.bundle.model, engine.state.optimizer

    def request(rid: str) -> Any:
        body = LossRequest.model_validate({"pairs": PAIRS, "train": True, "request_id": rid})
        return prepare(body, engine.bundle.tokenizer, engine.limits())  # type: ignore[union-attr]

    assert isinstance(engine._train_one(request("warm-up")), LossResult)  # optimizer state
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt["state"].items()}
    hook = model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))
    try:
        result = engine._train_one(request("nan-1"))
    finally:
        hook.remove()
    assert isinstance(result, ServiceError) and "non-finite" in result.message
    assert engine.version == 1 and engine.events.snapshot()["rejected_steps"] == 1
    assert "nan-1" not in engine.state.completed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    after = optimizer.state_dict()
    assert after["param_groups"] == opt["param_groups"]
    for p, entries in opt_state.items():
        assert all(torch.equal(v, after["state"][p][k]) for k, v in entries.items())
    assert all(p.grad is None for p in model.parameters())
    # the same request_id can be retried once the fault is gone
    assert isinstance(engine._train_one(request("nan-1")), LossResult)
    assert engine.version == 2


def test_admin_checkpoint_and_restart_resume(tmp_path: Path) -> None:
    settings = {"enable_grpc": False, "checkpoint_dir": tmp_path, "checkpoint_every": 3}
    with running_server(**settings) as srv, httpx.Client(base_url=srv.http_url, timeout=60) as c:
        responses = [_train(c, request_id=f"r-{i}").json() for i in range(4)]
        assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000000000003"]
        assert c.post("/admin/checkpoint").status_code == 401
        assert c.get("/admin/checkpoints").status_code == 401
        made = c.post("/admin/checkpoint", headers=AUTH)
        assert made.status_code == 200, made.text
        assert made.json()["version"] == 4 and made.json()["path"].endswith("ckpt-000000000004")
        listing = c.get("/admin/checkpoints", headers=AUTH).json()
        digest = _digest(srv)
    assert listing["latest"] == "ckpt-000000000004"
    assert [(x["version"], x["valid"]) for x in listing["checkpoints"]] == [(4, True), (3, True)]
    assert listing["live"] == {"version": 4, "weights_sha256": digest}
    assert listing["checkpoints"][0]["weights_sha256"] == digest

    with running_server(**settings) as srv, httpx.Client(base_url=srv.http_url, timeout=60) as c:
        assert srv.version == 4 and _digest(srv) == digest
        again = _train(c, request_id="r-2")
        assert again.json() == responses[2] and srv.version == 4
        assert _train(c, request_id="r-4").json()["new_model_version"] == 5
    # the shutdown checkpoint holds the final version
    assert (tmp_path / LATEST_FILE).read_text().strip() == "ckpt-000000000005"


def test_admin_checkpoint_without_a_directory_is_404() -> None:
    with (
        running_server(enable_grpc=False) as srv,
        httpx.Client(base_url=srv.http_url, timeout=60) as c,
    ):
        r = c.post("/admin/checkpoint", headers=AUTH)
    assert r.status_code == 404 and "DPO_CHECKPOINT_DIR" in r.json()["detail"]


# ---------------------------------------------------------------------- kill -9
def _step_body(i: int) -> dict[str, Any]:
    pair = {"prompt": f"Question {i}?", "chosen": " yes", "rejected": f" no{'!' * (i % 5)}"}
    return {"pairs": [pair], "train": True, "request_id": f"step-{i}"}


PROBE = [{"prompt": "probe", "chosen": " a fixed answer", "rejected": " another"}]


def _probe_from_checkpoint(path: Path, config: dict[str, Any]) -> list[float]:
    model = ModernDecoderLM(ModernDecoderConfig.from_dict(config))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    tok = ByteTokenizer()
    pairs = [
        PairTokens(
            tok.encode(p["prompt"], add_bos=True),
            tok.encode(p["chosen"], add_eos=True),
            tok.encode(p["rejected"], add_eos=True),
        )
        for p in PROBE
    ]
    with torch.inference_mode():
        out = pair_logps(model.eval(), pairs, strategy=LogpStrategy.TWO_ROWS, pad_id=tok.pad_id)
    return [float(x) for x in out.chosen]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_loses_no_checkpointed_step(tmp_path: Path) -> None:
    """SIGKILL at a (seeded) random moment of a stream of train steps; on restart the version
    is the last checkpoint (a multiple of 3, at least the last acknowledged multiple of 3), the
    weights are bit-identical to it, and replaying every request_id applies each step once."""
    rng = random.Random(1234)
    ckpt = tmp_path / "ckpt"
    env = {"checkpoint_dir": ckpt, "checkpoint_every": 3}
    acked: dict[int, dict[str, Any]] = {}
    statuses: list[int] = []
    errors: list[str] = []
    attempted = 0

    def stream(srv: ServerProcess) -> None:
        nonlocal attempted
        with srv.client() as c:
            for i in range(400):
                attempted = i + 1
                try:
                    r = c.post("/dpo/loss", json=_step_body(i), headers=AUTH)
                except httpx.TransportError:
                    return
                statuses.append(r.status_code)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                acked[i] = r.json()

    first = ServerProcess(tmp_path / "first.log", **env)
    try:
        first.wait_ready()
        worker = threading.Thread(target=stream, args=(first,), daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while len(acked) < 4 and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.5))
        first.signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        worker.join(30)
    finally:
        first.close()
    assert not errors and set(statuses) == {200}, errors
    assert sorted(acked) == list(range(len(acked))) and len(acked) >= 4
    assert all(acked[i]["new_model_version"] == i + 1 for i in acked)
    last_durable = max((v for v in (i + 1 for i in acked) if v % 3 == 0), default=0)

    second = ServerProcess(tmp_path / "second.log", **env)
    try:
        second.wait_ready()
        with second.client() as c:
            version = c.get("/v1/model").json()["model_version"]
            assert version % 3 == 0 and last_durable <= version <= attempted, (
                version,
                last_durable,
                attempted,
            )
            listing = c.get("/admin/checkpoints", headers=AUTH).json()
            probe = c.post("/dpo/loss", json={"pairs": PROBE}).json()
            path = ckpt / f"ckpt-{version:012d}"
            assert listing["live"]["version"] == version
            assert listing["live"]["weights_sha256"] == weights_digest(
                load_file(str(path / "model.safetensors"))
            )
            config = json.loads((path / "state.json").read_text())["model_config"]
            assert probe["chosen_logps"] == pytest.approx(
                _probe_from_checkpoint(path, config), abs=1e-4
            )
            # the client replays everything it sent: durable steps are answered from the
            # record (bit-identical responses), the rest are applied exactly once
            for i in range(attempted):
                r = c.post("/dpo/loss", json=_step_body(i), headers=AUTH)
                assert r.status_code == 200, r.text
                assert r.json()["new_model_version"] == i + 1
                if i < version and i in acked:
                    assert r.json() == acked[i]
            assert c.get("/v1/model").json()["model_version"] == attempted
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.log()
    finally:
        second.close()
    assert (ckpt / LATEST_FILE).read_text().strip() == f"ckpt-{attempted:012d}"
    assert "resumed from checkpoint" in second.log()
