"""No acknowledged step leaves a non-finite weight (``engine/step_guard.py``): a non-finite
update is refused before anything is written (``verify``) or restored bit for bit after the
step (``snapshot``); either way the answer is 422, the version does not move and
``dpo_rejected_steps_total`` counts it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

from conftest import API_KEY, running_server, small_settings
from dpo_service.client import DpoClient, DpoClientError
from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.engine.preparation import prepare
from dpo_service.engine.results import LossResult
from dpo_service.engine.step_guard import trial_update
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.schemas import LossRequest
from dpo_service.state.files import weights_digest

pytestmark = pytest.mark.timeout(180)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PAIRS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"},
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "no"},
]


def _engine(**overrides: Any) -> Engine:
    engine = make_engine(small_settings(enable_grpc=False, **overrides))
    engine.load()
    return engine


def _train(engine: Engine, rid: str) -> LossResult | BaseException:
    assert engine.bundle is not None
    body = LossRequest.model_validate({"pairs": PAIRS, "train": True, "request_id": rid})
    return engine._train_one(prepare(body, engine.bundle.tokenizer, engine.limits()))


def _everything(engine: Engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Copies of the weights and of the optimizer's state dict (tensors cloned)."""
    assert engine.bundle is not None and engine.state is not None
    weights = {k: v.clone() for k, v in engine.bundle.model.state_dict().items()}
    opt = engine.state.optimizer.state_dict()
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()}
    return weights, {"state": state, "param_groups": opt["param_groups"]}


def _assert_identical(engine: Engine, saved: tuple[dict[str, Any], dict[str, Any]]) -> None:
    weights, opt = saved
    assert engine.bundle is not None and engine.state is not None
    live = engine.bundle.model.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in weights.items())
    now = engine.state.optimizer.state_dict()
    assert now["param_groups"] == opt["param_groups"]
    assert now["state"].keys() == opt["state"].keys()
    for i, entries in opt["state"].items():
        assert entries.keys() == now["state"][i].keys()
        assert all(torch.equal(v, now["state"][i][k]) for k, v in entries.items())


def _nan_after_step(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault no input can cause: the optimizer step writes NaN into one weight."""
    assert engine.state is not None
    optimizer = engine.state.optimizer
    real = optimizer.step
    victim = optimizer.param_groups[0]["params"][-1]

    def step(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        with torch.no_grad():
            victim.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(optimizer, "step", step)


def test_an_infinite_learning_rate_is_refused_on_both_protocols() -> None:
    """DPO_LR=inf (no mock): every update would be NaN; each train call is a clear 422 /
    INVALID_ARGUMENT, nothing is written (the optimizer holds no state, the digest is the
    same) and each is counted."""
    with running_server(lr=float("inf")) as server:
        engine = server.core.engine
        digest = weights_digest(engine.bundle.model.state_dict())
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            r = c.post("/dpo/loss", json={"pairs": PAIRS, "train": True}, headers=AUTH)
            assert r.status_code == 422, r.text
            assert r.json()["code"] == "invalid_argument"
            assert "optimizer update would make" in r.json()["detail"]
            assert "not applied" in r.json()["detail"]
        with DpoClient.grpc(server.grpc_target, api_key=API_KEY) as g:
            with pytest.raises(DpoClientError) as caught:
                g.compute_loss([("Q: 2+2?", " 4", " five")], train=True)
            assert caught.value.code is ErrorCode.INVALID_ARGUMENT
            assert "optimizer update would make" in str(caught.value)
            assert g.compute_loss([("Q: 2+2?", " 4", " five")]).trained is False  # loss-only
        assert engine.events.snapshot()["rejected_steps"] == 2
        assert server.version == 0 and not engine.state.optimizer.state
        assert weights_digest(engine.bundle.model.state_dict()) == digest


def test_verify_refuses_a_non_finite_update_with_existing_optimizer_state() -> None:
    engine = _engine()
    assert isinstance(_train(engine, "warm-up"), LossResult)  # AdamW state exists now
    assert engine.state is not None
    saved = _everything(engine)
    for group in engine.state.optimizer.param_groups:
        group["lr"] = float("inf")
    result = _train(engine, "inf-1")
    for group in engine.state.optimizer.param_groups:
        group["lr"] = saved[1]["param_groups"][0]["lr"]
    assert isinstance(result, ServiceError) and result.code is ErrorCode.INVALID_ARGUMENT
    assert "would make" in result.message
    _assert_identical(engine, saved)
    assert engine.version == 1 and engine.events.snapshot()["rejected_steps"] == 1
    assert "inf-1" not in engine.state.completed
    assert isinstance(_train(engine, "after"), LossResult) and engine.version == 2


@pytest.mark.parametrize("warm", [True, False], ids=["with-state", "first-step"])
def test_snapshot_restores_weights_and_optimizer_state_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    """DPO_STEP_ROLLBACK=snapshot: the post-step check finds the NaN and restores; on the
    first step the AdamW state the step created is removed again."""
    engine = _engine(step_rollback="snapshot")
    if warm:
        assert isinstance(_train(engine, "warm-up"), LossResult)
    saved = _everything(engine)
    version = engine.version
    _nan_after_step(engine, monkeypatch)
    result = _train(engine, "nan-1")
    assert isinstance(result, ServiceError) and result.code is ErrorCode.INVALID_ARGUMENT
    assert "restored to their pre-step values" in result.message
    _assert_identical(engine, saved)
    assert engine.version == version and engine.events.snapshot()["rejected_steps"] == 1
    assert engine.info().memory.rollback_snapshot_bytes > 0
    monkeypatch.undo()
    assert isinstance(_train(engine, "nan-1"), LossResult)  # the same id applies now


def test_snapshot_rollback_through_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    with running_server(step_rollback="snapshot", enable_grpc=False) as server:
        engine = server.core.engine
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            body = {"pairs": PAIRS, "train": True}
            assert c.post("/dpo/loss", json=body, headers=AUTH).status_code == 200
            digest = weights_digest(engine.bundle.model.state_dict())
            _nan_after_step(engine, monkeypatch)
            r = c.post("/dpo/loss", json=body, headers=AUTH)
            assert r.status_code == 422 and "restored" in r.json()["detail"], r.text
            assert c.get("/v1/model").json()["step_rollback"] == "snapshot"
        assert server.version == 1 and engine.events.snapshot()["rejected_steps"] == 1
        assert weights_digest(engine.bundle.model.state_dict()) == digest


def test_verify_fails_closed_when_the_post_step_check_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no copy to restore (``verify``), a fault after a verified update is not
    acknowledged: 500, counted, and training stops until a restart."""
    engine = _engine()
    assert isinstance(_train(engine, "warm-up"), LossResult)
    _nan_after_step(engine, monkeypatch)
    result = _train(engine, "nan-1")
    assert isinstance(result, ServiceError) and result.code is ErrorCode.INTERNAL
    assert "training is stopped" in result.message
    assert engine.version == 1 and engine.events.snapshot()["rejected_steps"] == 1
    monkeypatch.undo()
    again = _train(engine, "nan-2")
    assert isinstance(again, ServiceError) and again.code is ErrorCode.UNAVAILABLE
    assert "restart" in again.message and engine.version == 1


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device on this machine")]),
]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_the_dry_run_computes_exactly_what_the_step_writes(device: str) -> None:
    """``verify`` is exact: the one-tensor trial update equals the real step bit for bit
    (weight decay on, AdamW state from two earlier steps; on CUDA AdamW takes its
    multi-tensor path for the step and a one-tensor list for the trial)."""
    engine = _engine(weight_decay=0.1, device=device)
    for i in range(2):
        assert isinstance(_train(engine, f"warm-{i}"), LossResult)
    assert engine.state is not None
    optimizer = engine.state.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device)
    trials = [trial_update(optimizer, p) for p in params]
    optimizer.step()
    for p, (new, state) in zip(params, trials, strict=True):
        assert torch.equal(new, p.detach())
        live = [optimizer.state[p][k] for k in ("step", "exp_avg", "exp_avg_sq")]
        assert all(torch.equal(a, b) for a, b in zip(state, live, strict=True))
