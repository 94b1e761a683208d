"""``DPO_LOGP_HEAD`` and ``DPO_MEMORY_BUDGET_MB`` reach the library's LM-head choice in the
engine's train step, and every head trains to the same model (README "Benchmarks")."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from pydantic import ValidationError

from dpo_service.engine.preparation import PreparedRequest
from dpo_service.engine.train_state import TrainState
from dpo_service.engine.train_step import run_train_step
from dpo_service.models.bundle import ByteTripleTokenizer, ModelBundle
from dpo_service.settings import LogpHeadName, Settings
from modern_llm.alignment import lm_head
from modern_llm.alignment.dpo_loss import LossConfig
from modern_llm.alignment.logprobs import PairTokens
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM


def _pairs(n: int = 3) -> list[PairTokens]:
    """1,230 response positions: the stored head's softmax, 1,230 × 259 float32, is 1.2 MiB."""
    rng = random.Random(0)
    ids = lambda k: [rng.randrange(256) for _ in range(k)]  # noqa: E731
    return [PairTokens(ids(4 + i), ids(200 + 5 * i), ids(205)) for i in range(n)]


def _step(settings: Settings, ran: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = ModernDecoderConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.1)
    model = ModernDecoderLM(cfg).eval()
    bundle = ModelBundle(model, ByteTripleTokenizer(), "t", "builtin", 259, cfg.max_seq_len)
    state = TrainState.create(bundle, settings)
    pairs = _pairs()
    request = PreparedRequest(
        pairs=pairs,
        loss=LossConfig(beta=0.1),
        reference="none",
        reference_chosen=None,
        reference_rejected=None,
        train=True,
        request_id=None,
        expected_version=None,
        num_tokens=sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs),
    )
    before = len(ran)
    result = run_train_step(state, request, settings)
    assert len(ran) > before  # the LM head ran (once per micro-batch)
    return result.grad_norm or 0.0, copy.deepcopy(model.state_dict())


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which LM head each call ran (the real functions run; they are only recorded)."""
    calls: list[str] = []
    for name in ("stored_token_logps", "linear_token_logps"):
        real = getattr(lm_head, name)

        def record(*args: object, _real: object = real, _name: str = name) -> torch.Tensor:
            calls.append(_name)
            return _real(*args)  # type: ignore[operator, no-any-return]

        monkeypatch.setattr(lm_head, name, record)
    return calls


def test_train_step_head_follows_the_settings_and_trains_alike(ran: list[str]) -> None:
    auto_norm, auto = _step(Settings(), ran)
    assert set(ran) == {"stored_token_logps"}  # default: stored, the batch fits easily
    ran.clear()
    tight_norm, tight = _step(Settings(memory_budget_mb=1), ran)  # 1 MiB: too small
    assert set(ran) == {"linear_token_logps"}
    ran.clear()
    chunked_norm, chunked = _step(Settings(logp_head=LogpHeadName.CHUNKED), ran)
    assert set(ran) == {"linear_token_logps"}
    assert auto_norm == pytest.approx(chunked_norm, rel=1e-4) == pytest.approx(tight_norm)
    for name, weight in auto.items():
        torch.testing.assert_close(weight, chunked[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(weight, tight[name], rtol=1e-5, atol=1e-6, msg=name)


def test_memory_budget_setting_is_validated() -> None:
    assert Settings().memory_budget_bytes is None
    assert Settings(memory_budget_mb=0).memory_budget_bytes is None  # 0: derive
    assert Settings(memory_budget_mb=3).memory_budget_bytes == 3 * 2**20
    with pytest.raises(ValidationError):
        Settings(memory_budget_mb=-1)
    with pytest.raises(ValidationError):
        Settings(logp_head="logits")
