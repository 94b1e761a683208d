"""Hypothesis property tests for ``modern_llm.alignment.dpo_loss``."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modern_llm.alignment.dpo_loss import (
    LossConfig,
    LossType,
    PreferenceLogps,
    dpo_loss,
    preference_loss,
    sigmoid_losses,
)

SETTINGS = settings(max_examples=100, deadline=None)

moderate = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
extreme = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
betas = st.floats(1e-3, 10.0, allow_nan=False, allow_infinity=False)
shapes = st.one_of(
    st.tuples(st.integers(1, 8)),
    st.tuples(st.integers(1, 4), st.integers(1, 6)),
)


def softplus(x: float) -> float:
    """``log(1 + e^x)``, stable; ``−log σ(z) = softplus(−z)``."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


@st.composite
def pairs(
    draw: st.DrawFn, elements: st.SearchStrategy[float] = moderate, one_d: bool = False
) -> tuple[list[float], list[float], tuple[int, ...]]:
    shape = draw(st.tuples(st.integers(1, 8)) if one_d else shapes)
    n = math.prod(shape)
    chosen = draw(st.lists(elements, min_size=n, max_size=n))
    rejected = draw(st.lists(elements, min_size=n, max_size=n))
    return chosen, rejected, shape


def tensor(values: list[float], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).reshape(shape)


@SETTINGS
@given(pairs(), betas)
def test_matches_float64_reference(
    data: tuple[list[float], list[float], tuple[int, ...]], beta: float
) -> None:
    chosen, rejected, shape = data
    loss = dpo_loss(
        tensor(chosen, shape, torch.float64), tensor(rejected, shape, torch.float64), beta
    )
    expected = sum(softplus(-beta * (c - r)) for c, r in zip(chosen, rejected, strict=True))
    expected /= len(chosen)
    assert loss.shape == ()
    assert math.isclose(loss.item(), expected, rel_tol=1e-9, abs_tol=1e-12)


@SETTINGS
@given(pairs(extreme), betas)
def test_nonnegative_and_finite_in_float32_for_extremes(
    data: tuple[list[float], list[float], tuple[int, ...]], beta: float
) -> None:
    chosen, rejected, shape = data
    c = tensor(chosen, shape, torch.float32).requires_grad_()
    r = tensor(rejected, shape, torch.float32).requires_grad_()
    loss = dpo_loss(c, r, beta)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() >= 0.0
    assert c.grad is not None and r.grad is not None
    assert bool(torch.isfinite(c.grad).all()) and bool(torch.isfinite(r.grad).all())
    assert bool((c.grad <= 0).all()) and bool((r.grad >= 0).all())


@SETTINGS
@given(pairs(one_d=True), betas)
def test_antisymmetry(data: tuple[list[float], list[float], tuple[int, ...]], beta: float) -> None:
    """−log σ(x) + log σ(−x) = −x, so dpo(c, r) − dpo(r, c) = −β·mean(c − r)."""
    chosen, rejected, shape = data
    c, r = tensor(chosen, shape, torch.float64), tensor(rejected, shape, torch.float64)
    lhs = (dpo_loss(c, r, beta) - dpo_loss(r, c, beta)).item()
    rhs = -beta * (c - r).mean().item()
    scale = beta * max(1.0, float((c - r).abs().max()))
    assert math.isclose(lhs, rhs, rel_tol=1e-9, abs_tol=1e-10 * scale)


@SETTINGS
@given(pairs(extreme, one_d=True), betas)
def test_reference_free_sigmoid_equals_seed(
    data: tuple[list[float], list[float], tuple[int, ...]], beta: float
) -> None:
    chosen, rejected, shape = data
    c, r = tensor(chosen, shape, torch.float32), tensor(rejected, shape, torch.float32)
    out = preference_loss(PreferenceLogps(c, r), LossConfig(LossType.SIGMOID, beta=beta))
    assert torch.equal(out.loss, dpo_loss(c, r, beta))


@SETTINGS
@given(
    pairs(one_d=True),
    st.lists(moderate, min_size=16, max_size=16),
    st.floats(-1e3, 1e3),
    st.floats(-1e3, 1e3),
    betas,
    st.floats(0.0, 0.5),
)
def test_shift_invariance(
    data: tuple[list[float], list[float], tuple[int, ...]],
    refs: list[float],
    k_policy: float,
    k_reference: float,
    beta: float,
    eps: float,
) -> None:
    """Adding a constant to both policy log-probs (and another to both reference log-probs)
    leaves h, hence the sigmoid / cDPO loss, unchanged."""
    chosen, rejected, shape = data
    b = shape[0]
    pc, pr = tensor(chosen, shape, torch.float64), tensor(rejected, shape, torch.float64)
    rc, rr = (
        torch.tensor(refs[:b], dtype=torch.float64),
        torch.tensor(refs[8 : 8 + b], dtype=torch.float64),
    )
    base = sigmoid_losses(PreferenceLogps(pc, pr, rc, rr), beta, eps)
    shifted_logps = PreferenceLogps(
        pc + k_policy, pr + k_policy, rc + k_reference, rr + k_reference
    )
    shifted = sigmoid_losses(shifted_logps, beta, eps)
    # each shift costs ~1 ulp of values up to ~4e3 in h: 4e3 · 2.2e-16 · few, times β ≤ 10
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-9)
    seed_base = dpo_loss(pc, pr, beta)
    torch.testing.assert_close(
        dpo_loss(pc + k_policy, pr + k_policy, beta), seed_base, rtol=1e-9, atol=1e-9
    )
