"""Sessions' engine core (issue 12): LoRA through PEFT on one shared frozen base; isolation
of sessions, the base and the default model; the LoRA math; accumulation equals one step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.engine.forward import forward_logps
from dpo_service.engine.preparation import PreparedRequest, prepare
from dpo_service.engine.sessions import lora
from dpo_service.engine.sessions.registry import SessionRegistry
from dpo_service.engine.sessions.session import OptimizerSpec, SessionConfig
from dpo_service.engine.sessions.training import session_losses, session_step, session_train
from dpo_service.engine.train_step import run_train_step
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.schemas import LossRequest

PAIRS = [
    {"prompt": "The sky is", "chosen": " blue today.", "rejected": " made of cheese."},
    {"prompt": "Two plus two", "chosen": " is four.", "rejected": " is five!"},
    {"prompt": "Water", "chosen": " is wet.", "rejected": " burns."},
    {"prompt": "Cats", "chosen": " purr softly.", "rejected": " bark loudly."},
]


def _engine(**overrides: object) -> Engine:
    engine = make_engine(small_settings(**overrides))
    engine.load()
    return engine


def _request(
    engine: Engine, session: str | None, pairs: list[dict[str, str]], **fields: object
) -> PreparedRequest:
    accumulate = bool(fields.pop("accumulate_", False))
    body = LossRequest.model_validate({"pairs": pairs, **fields})
    limits = dataclasses.replace(engine.limits(), has_reference=True)
    prepared = prepare(body, engine.require_bundle().tokenizer, limits)
    return dataclasses.replace(prepared, session=session, accumulate=accumulate)


def _registry(engine: Engine) -> SessionRegistry:
    assert engine.sessions is not None
    return engine.sessions


def _logps(model: object, engine: Engine, pairs: list[dict[str, str]]) -> torch.Tensor:
    prepared = _request(engine, None, pairs)
    with torch.inference_mode():
        out = forward_logps(model, prepared.pairs, engine.settings, engine.require_bundle())  # type: ignore[arg-type]
    return torch.cat([out.chosen, out.rejected])


def _config(**lora_fields: object) -> SessionConfig:
    return SessionConfig(
        lora=lora.LoraSpec(**{"rank": 4, "alpha": 8.0, **lora_fields}),  # type: ignore[arg-type]
        optimizer=OptimizerSpec(lr=5e-3),
    )


def test_training_a_session_moves_nothing_else() -> None:
    engine = _engine()
    reg = _registry(engine)
    a, _ = reg.create(_config(seed=1))
    b, _ = reg.create(_config(seed=2))
    base = reg.require_base()
    assert base is not engine.require_bundle().model  # never the default model
    default = engine.require_bundle().causal_lm
    before = {
        "base": _logps(base, engine, PAIRS),
        "default": _logps(default, engine, PAIRS),
        "b": _logps(b.view, engine, PAIRS),
        "a": _logps(a.view, engine, PAIRS),
    }
    assert torch.equal(before["a"], before["base"])  # B = 0: a new adapter changes nothing
    for i in range(3):
        result = session_train(
            a, _request(engine, a.id, PAIRS, train=True, request_id=f"a-{i}"), reg.settings_of(a)
        )
        assert result.new_model_version == i + 1
    assert a.version == 3 and b.version == 0 and engine.version == 0
    assert torch.equal(_logps(base, engine, PAIRS), before["base"])
    assert torch.equal(_logps(default, engine, PAIRS), before["default"])
    assert torch.equal(_logps(b.view, engine, PAIRS), before["b"])
    assert not torch.equal(_logps(a.view, engine, PAIRS), before["a"])
    # and a default-model step moves no session nor the base
    a_now = _logps(a.view, engine, PAIRS)
    assert engine.state is not None
    run_train_step(engine.state, _request(engine, None, PAIRS, train=True), engine.settings)
    assert engine.version == 1
    assert torch.equal(_logps(a.view, engine, PAIRS), a_now)
    assert torch.equal(_logps(base, engine, PAIRS), before["base"])


def test_lora_layer_matches_naive_float64() -> None:
    engine = _engine()
    reg = _registry(engine)
    s, _ = reg.create(_config(seed=3, alpha=12.0))
    for _ in range(2):
        session_train(s, _request(engine, s.id, PAIRS, train=True), reg.settings_of(s))
    layer = reg.require_base().layers[0].attn.q_proj  # type: ignore[union-attr,index]
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    w = layer.get_base_layer().weight.double()
    a_w, b_w = layer.lora_A[s.id].weight.double(), layer.lora_B[s.id].weight.double()
    assert bool(b_w.abs().sum() > 0)  # trained: B moved off zero
    naive = x @ w.T + (12.0 / 4) * (x @ a_w.T @ b_w.T)
    with lora.adapter_on(reg.require_base(), s.id), torch.no_grad():
        got = layer(x.float()).double()
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # disabled outside adapter_on: the base layer alone
        torch.testing.assert_close(layer(x.float()).double(), x @ w.T, atol=1e-5, rtol=1e-5)


def test_accumulated_requests_equal_one_big_step() -> None:
    engine = _engine()
    reg = _registry(engine)
    big, _ = reg.create(_config(seed=5))
    acc, _ = reg.create(_config(seed=5))
    session_train(big, _request(engine, big.id, PAIRS, train=True), reg.settings_of(big))
    for k, half in enumerate((PAIRS[:2], PAIRS[2:])):
        r = session_train(
            acc,
            _request(engine, acc.id, half, train=True, request_id=f"acc-{k}", accumulate_=True),
            reg.settings_of(acc),
        )
        assert r.extra["accumulated"] and acc.version == 0  # no step yet
    # a retried accumulate adds nothing
    session_train(
        acc,
        _request(engine, acc.id, PAIRS[:2], train=True, request_id="acc-0", accumulate_=True),
        reg.settings_of(acc),
    )
    assert acc.accumulated.pairs == 4
    outcome = session_step(acc, "step-1")
    assert outcome.new_model_version == 1 and outcome.pairs == 4 and outcome.requests == 2
    assert session_step(acc, "step-1").replayed  # idempotent by request_id
    assert acc.version == 1 and big.version == 1
    for name, p in big.params.items():
        other = acc.params[name.replace(big.id, acc.id)]
        # AdamW's first step is about lr·sign(g) (lr 5e-3): an element whose gradient is near
        # Adam's eps turns float32 rounding of the two summation orders into ~1e-6 moves
        torch.testing.assert_close(other, p, atol=1e-5, rtol=1e-4)
    with pytest.raises(ServiceError) as err:
        session_step(acc, "step-2")  # nothing accumulated
    assert err.value.code is ErrorCode.CONFLICT
    session_train(
        acc,
        _request(engine, acc.id, PAIRS[:1], train=True, accumulate_=True),
        reg.settings_of(acc),
    )
    with pytest.raises(ServiceError) as err:  # a plain step would drop the waiting gradient
        session_train(acc, _request(engine, acc.id, PAIRS, train=True), reg.settings_of(acc))
    assert err.value.code is ErrorCode.CONFLICT and acc.version == 1


def test_session_limits_config_keys_and_delete() -> None:
    engine = _engine(max_sessions=2)
    reg = _registry(engine)
    s1, key1 = reg.create(_config())
    with pytest.raises(ServiceError) as bad:
        reg.create(_config(target_modules=("lm_head",)))
    assert bad.value.code is ErrorCode.INVALID_ARGUMENT and "lm_head" in bad.value.message
    with pytest.raises(ServiceError) as bad:
        reg.create(_config(target_modules=("no_such_proj",)))
    assert bad.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ServiceError) as bad:
        reg.create(_config(rank=0))
    assert bad.value.code is ErrorCode.INVALID_ARGUMENT
    assert len(reg.sessions) == 1  # refused configs made nothing
    s2, key2 = reg.create(_config())
    with pytest.raises(ServiceError) as full:
        reg.create(_config())
    assert full.value.code is ErrorCode.OVERLOADED and "DPO_MAX_SESSIONS" in full.value.message
    assert reg.authorize(s1.id, key1) is s1
    with pytest.raises(ServiceError) as wrong:
        reg.authorize(s1.id, key2)  # another session's key
    assert wrong.value.code is ErrorCode.UNAUTHENTICATED
    reg.delete(s2.id)
    with pytest.raises(ServiceError) as gone:
        reg.authorize(s2.id, key2)
    assert gone.value.code is ErrorCode.NOT_FOUND
    names = [n for n, _ in reg.require_base().named_parameters() if s2.id in n]
    assert names == []  # the adapter's tensors are gone from the base
    reg.create(_config())  # room again


def test_session_loss_with_base_reference_starts_at_zero_margin() -> None:
    engine = _engine()
    reg = _registry(engine)
    s, _ = reg.create(_config())
    request = _request(engine, s.id, PAIRS, reference="frozen")
    (result,) = session_losses(s, [request], reg.settings_of(s))
    assert not isinstance(result, BaseException)
    assert result.reference_chosen_logps == result.chosen_logps  # adapter B = 0: policy = base
    assert all(m == 0.0 for m in result.margins)
    assert result.model_version == 0


@pytest.mark.parametrize("keep_reference", [False, True])
def test_a_sessions_base_reference_goes_through_the_reference_cache(
    tmp_path: Path, keep_reference: bool
) -> None:
    """Issue 14 x 12: a session's ``base`` reference (the base with its adapter off) is served
    from the reference log-prob cache: the second identical request is all hits and returns the
    same reference log-probs. Without a kept frozen copy the sessions' own base is bound as an
    ``adapter-off`` reference; with one, the base *is* that copy and shares its rows."""
    engine = _engine(reference_cache=str(tmp_path / "ref.sqlite"), keep_reference=keep_reference)
    reg = _registry(engine)
    s, _ = reg.create(_config())
    lookup = engine.reference_lookup if keep_reference else engine._session_base_lookup
    assert lookup is not None and lookup.cache.enabled
    assert ("adapter-off" in lookup.identity) is not keep_reference

    def once() -> list[float]:
        request = _request(engine, s.id, PAIRS, reference="frozen")
        (result,) = session_losses(s, [request], reg.settings_of(s))
        assert not isinstance(result, BaseException) and result.reference_chosen_logps
        return result.reference_chosen_logps + (result.reference_rejected_logps or [])

    cold = once()
    hits_before = engine.events.registry.get_sample_value("dpo_reference_cache_hits_total")
    warm = once()
    hits_after = engine.events.registry.get_sample_value("dpo_reference_cache_hits_total")
    assert warm == cold
    assert hits_after - hits_before == 2 * len(PAIRS)  # chosen and rejected of every pair
