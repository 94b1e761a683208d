"""Example-based tests for ``modern_llm.alignment.dpo_loss``.

Expected values are computed by hand with ``math`` (see each docstring), never by calling the
code under test, so a wrong formula fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from modern_llm.alignment.dpo_loss import (
    LOSS_FUNCTIONS,
    LossConfig,
    LossType,
    PreferenceLogps,
    dpo_loss,
    dpo_metrics,
    hinge_losses,
    ipo_losses,
    preference_loss,
    robust_losses,
    sigmoid_losses,
    simpo_losses,
)

SEED_CHOSEN = [-2.1, -1.8, -2.5, -1.9]
SEED_REJECTED = [-3.2, -2.9, -3.1, -2.8]


def softplus(x: float) -> float:
    """``log(1 + e^x)`` in pure python, stable for large |x|; ``−log σ(z) = softplus(−z)``."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def t64(values: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- seed dpo_loss


def test_seed_usage_example_prints_formula_value(capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's usage example, verbatim up to the backward line.

    Margins chosen − rejected are 1.1, 1.1, 0.6, 0.9; times β = 0.1: 0.11, 0.11, 0.06, 0.09.
    −log σ(x) = log(1 + e^{−x}):  x=0.11 → log(1.895834) = 0.639659,
    x=0.06 → log(1.941765) = 0.663598,  x=0.09 → log(1.913931) = 0.649157.
    Mean = (2·0.639659 + 0.663598 + 0.649157) / 4 = 0.648018 → printed "DPO Loss: 0.6480".
    """
    chosen_logprobs = torch.tensor(SEED_CHOSEN)
    rejected_logprobs = torch.tensor(SEED_REJECTED)
    loss = dpo_loss(chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs, beta=0.1)
    print(f"DPO Loss: {loss.item():.4f}")
    assert capsys.readouterr().out == "DPO Loss: 0.6480\n"
    expected = sum(softplus(-0.1 * m) for m in (1.1, 1.1, 0.6, 0.9)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.shape == ()


def test_seed_example_backward_with_requires_grad() -> None:
    """The example's ``loss.backward()`` runs once the inputs require grad (as in the README).

    d/dc_i mean(−log σ(β(c−r))) = −β·σ(−βm_i)/N; for m_1 = 1.1: −0.1·σ(−0.11)/4
    = −0.1·0.472528/4 = −0.0118132.
    """
    chosen = torch.tensor(SEED_CHOSEN, requires_grad=True)
    rejected = torch.tensor(SEED_REJECTED, requires_grad=True)
    dpo_loss(chosen_logprobs=chosen, rejected_logprobs=rejected, beta=0.1).backward()
    assert chosen.grad is not None and rejected.grad is not None
    sig = 1 / (1 + math.exp(0.11))
    assert chosen.grad[0].item() == pytest.approx(-0.1 * sig / 4, rel=1e-5)
    assert rejected.grad[0].item() == pytest.approx(0.1 * sig / 4, rel=1e-5)


def test_seed_example_backward_without_grad_raises() -> None:
    """As written, the seed's tensors have no grad, so PyTorch refuses ``backward`` (by design)."""
    loss = dpo_loss(torch.tensor(SEED_CHOSEN), torch.tensor(SEED_REJECTED), beta=0.1)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_dpo_loss_2d_means_over_all_elements() -> None:
    """(B, T) input: β = 1, margins [[0, 2], [−1, 3]] →
    mean(log 2, softplus(−2), softplus(1), softplus(−3)) = (0.693147 + 0.126928 + 1.313262 +
    0.048587) / 4 = 0.545481."""
    chosen = t64([[1.0, 2.0], [0.0, 3.0]])
    rejected = t64([[1.0, 0.0], [1.0, 0.0]])
    expected = (math.log(2) + softplus(-2) + softplus(1) + softplus(-3)) / 4
    assert dpo_loss(chosen, rejected, beta=1.0).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.545481, abs=1e-6)


def test_dpo_loss_scalar_input_and_int_beta() -> None:
    """0-d tensors work; β = 2 (an int) with margin 0.5 → softplus(−1) = log(1 + e^{−1})."""
    loss = dpo_loss(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64), 2
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-12)


def test_dpo_loss_keeps_dtype() -> None:
    c = torch.tensor(SEED_CHOSEN, dtype=torch.float64)
    r = torch.tensor(SEED_REJECTED, dtype=torch.float64)
    assert dpo_loss(c, r).dtype == torch.float64


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [
        (torch.zeros(4), torch.zeros(5)),
        (torch.zeros(4), torch.zeros(4, 1)),
        (torch.zeros(2, 3), torch.zeros(3, 2)),
        (torch.zeros(()), torch.zeros(1)),
    ],
)
def test_dpo_loss_shape_mismatch(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(chosen, rejected)


@pytest.mark.parametrize(
    "beta",
    [0, 0.0, -1, -0.1, math.nan, math.inf, -math.inf, True, False, "0.1", None, torch.tensor(0.1)],
)
def test_dpo_loss_bad_beta(beta: object) -> None:
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(3), torch.zeros(3), beta)  # type: ignore[arg-type]


def test_dpo_loss_rejects_grad_tensor_beta() -> None:
    """A tensor β (even one requiring grad) is refused: β is a plain hyper-parameter."""
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(3), torch.zeros(3), torch.tensor(0.1, requires_grad=True))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chosen", "rejected", "match"),
    [
        (torch.zeros(0), torch.zeros(0), "empty"),
        (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), "floating"),
        ([0.0, 1.0], torch.zeros(2), "Tensor"),
    ],
)
def test_dpo_loss_bad_tensors(chosen: object, rejected: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dpo_loss(chosen, rejected)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- gradients


def test_gradient_signs_raise_chosen_lower_rejected() -> None:
    """d loss/d chosen < 0 and d loss/d rejected > 0 for every element, whatever the margin."""
    chosen = torch.tensor([-5.0, -1.0, -3.0, 2.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -5.0, -3.0, -10.0], requires_grad=True)
    dpo_loss(chosen, rejected, beta=0.5).backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert bool((chosen.grad < 0).all()) and bool((rejected.grad > 0).all())
    # one gradient-descent step widens every margin
    with torch.no_grad():
        before = chosen - rejected
        after = (chosen - 0.1 * chosen.grad) - (rejected - 0.1 * rejected.grad)
    assert bool((after > before).all())


def test_gradient_is_beta_over_two_at_zero_margin() -> None:
    """d/dx −log σ(βx) = −β(1 − σ(βx)) = −β/2 at x = 0; the mean over N = 4 divides by 4:
    β = 0.1 → d/d chosen = −0.0125, d/d rejected = +0.0125."""
    chosen = torch.full((4,), -2.0, dtype=torch.float64, requires_grad=True)
    rejected = torch.full((4,), -2.0, dtype=torch.float64, requires_grad=True)
    dpo_loss(chosen, rejected, beta=0.1).backward()
    assert chosen.grad is not None and rejected.grad is not None
    torch.testing.assert_close(chosen.grad, torch.full((4,), -0.0125, dtype=torch.float64))
    torch.testing.assert_close(rejected.grad, torch.full((4,), 0.0125, dtype=torch.float64))


def test_gradient_vanishes_at_large_margin() -> None:
    """Margin 200, β = 0.1: |grad| = β·σ(−20)/N = 0.1·2.06e−9/2 ≈ 1.0e−10 < 1e−8."""
    chosen = torch.tensor([0.0, 0.0], requires_grad=True)
    rejected = torch.tensor([-200.0, -200.0], requires_grad=True)
    loss = dpo_loss(chosen, rejected, beta=0.1)
    loss.backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert float(chosen.grad.abs().max()) < 1e-8
    assert float(rejected.grad.abs().max()) < 1e-8
    assert float(chosen.grad.abs().max()) > 0  # small, not lost
    assert loss.item() == pytest.approx(softplus(-20.0), rel=1e-4)


def test_extreme_values_are_finite() -> None:
    """±1e4 log-probs, β = 1: −log σ(−2e4) = 2e4 exactly in fp32, no inf/nan, grads finite."""
    chosen = torch.tensor([-1e4, 1e4], requires_grad=True)
    rejected = torch.tensor([1e4, -1e4], requires_grad=True)
    loss = dpo_loss(chosen, rejected, beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1e4, rel=1e-6)  # (2e4 + 0) / 2
    assert chosen.grad is not None and bool(torch.isfinite(chosen.grad).all())


# ----------------------------------------------------------------------------- PreferenceLogps


def test_preference_logps_validation() -> None:
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="both reference"):
        PreferenceLogps(z, z, reference_chosen=z)
    with pytest.raises(ValueError, match="both reference"):
        PreferenceLogps(z, z, reference_rejected=z)
    with pytest.raises(ValueError, match="policy_rejected"):
        PreferenceLogps(z, torch.zeros(4))
    with pytest.raises(ValueError, match="reference_rejected"):
        PreferenceLogps(z, z, reference_chosen=z, reference_rejected=torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        PreferenceLogps(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        PreferenceLogps(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="both chosen_lengths"):
        PreferenceLogps(z, z, chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        PreferenceLogps(
            z, z, chosen_lengths=torch.ones(3), rejected_lengths=torch.tensor([1, 0, 2])
        )
    with pytest.raises(ValueError, match="chosen_lengths"):
        PreferenceLogps(z, z, chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(3))


# ----------------------------------------------------------------------------- variants, by hand


def _with_reference() -> PreferenceLogps:
    """π_c = −1, π_r = −2, ρ_c = ρ_r = −1.5 → h = (−1 + 1.5) − (−2 + 1.5) = 0.5 + 0.5 = 1."""
    return PreferenceLogps(t64([-1.0]), t64([-2.0]), t64([-1.5]), t64([-1.5]))


def test_sigmoid_with_reference_by_hand() -> None:
    """h = 1, β = 0.5 → βh = 0.5; −log σ(0.5) = log(1 + e^{−0.5}) = 0.474077."""
    losses = sigmoid_losses(_with_reference(), beta=0.5)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(0.474077, abs=1e-6)


def test_cdpo_label_smoothing_by_hand() -> None:
    """ε = 0.1, βh = 0.5: 0.9·softplus(−0.5) + 0.1·softplus(0.5); softplus(x) − softplus(−x) = x,
    so = 0.9·0.474077 + 0.1·(0.474077 + 0.5) = 0.474077 + 0.05 = 0.524077."""
    losses = sigmoid_losses(_with_reference(), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.524077, abs=1e-6)
    # ε = 0.5 is allowed for cDPO: the loss is then (softplus(−z) + softplus(z))/2, flat-ish
    half = sigmoid_losses(_with_reference(), beta=0.5, label_smoothing=0.5)
    assert half.item() == pytest.approx(0.474077 + 0.25, abs=1e-6)


def test_reference_changes_the_margin() -> None:
    """Reference-free, π_c − π_r = 1 too, so the same 0.474077; with ρ_c = −1, ρ_r = −3
    h = 0 − 1 = −1, βh = −0.5 → softplus(0.5) = 0.974077."""
    free = sigmoid_losses(PreferenceLogps(t64([-1.0]), t64([-2.0])), beta=0.5)
    assert free.item() == pytest.approx(0.474077, abs=1e-6)
    ref = PreferenceLogps(t64([-1.0]), t64([-2.0]), t64([-1.0]), t64([-3.0]))
    assert sigmoid_losses(ref, beta=0.5).item() == pytest.approx(0.974077, abs=1e-6)


def test_hinge_by_hand() -> None:
    """β = 0.5, margins h = 1, 3, −2 → max(0, 1 − βh) = 0.5, 0 (1 − 1.5 < 0), 2."""
    logps = PreferenceLogps(t64([1.0, 3.0, -2.0]), t64([0.0, 0.0, 0.0]))
    torch.testing.assert_close(hinge_losses(logps, beta=0.5), t64([0.5, 0.0, 2.0]))


def test_ipo_by_hand() -> None:
    """Lengths n_c = 4, n_r = 3; β = 0.5 so 1/(2β) = 1.
    Pair 1, reference-free: π̄_c = −4/4 = −1, π̄_r = −9/3 = −3, h̄ = 2 → (2 − 1)² = 1.
    With ρ_c = −8 (ρ̄ = −2), ρ_r = −3 (ρ̄ = −1): h̄ = (−1 + 2) − (−3 + 1) = 1 + 2 = 3 → (3−1)² = 4.
    """
    lengths = {"chosen_lengths": torch.tensor([4]), "rejected_lengths": torch.tensor([3])}
    free = PreferenceLogps(t64([-4.0]), t64([-9.0]), **lengths)
    assert ipo_losses(free, beta=0.5).item() == pytest.approx(1.0, abs=1e-12)
    ref = PreferenceLogps(t64([-4.0]), t64([-9.0]), t64([-8.0]), t64([-3.0]), **lengths)
    assert ipo_losses(ref, beta=0.5).item() == pytest.approx(4.0, abs=1e-12)


def test_robust_by_hand() -> None:
    """ε = 0.25, βh = 0.5, a = softplus(−0.5) = 0.474077, softplus(0.5) = a + 0.5:
    (0.75·a − 0.25·(a + 0.5)) / (1 − 0.5) = (0.5a − 0.125)/0.5 = a − 0.25 = 0.224077.
    With ε = 0 robust equals plain DPO: 0.474077."""
    assert robust_losses(_with_reference(), 0.5, 0.25).item() == pytest.approx(0.224077, abs=1e-6)
    assert robust_losses(_with_reference(), 0.5, 0.0).item() == pytest.approx(0.474077, abs=1e-6)


def test_simpo_by_hand() -> None:
    """π̄_c = −4/4 = −1, π̄_r = −9/3 = −3; β = 2, γ = 1: z = 2·2 − 1 = 3;
    −log σ(3) = log(1 + e^{−3}) = 0.048587. The reference (here absurd) is ignored.
    With ε = 0.2: 0.8·softplus(−3) + 0.2·softplus(3) = 0.048587 + 0.2·3 = 0.648587."""
    lengths = {"chosen_lengths": torch.tensor([4]), "rejected_lengths": torch.tensor([3.0])}
    logps = PreferenceLogps(t64([-4.0]), t64([-9.0]), t64([100.0]), t64([-100.0]), **lengths)
    assert simpo_losses(logps, 2.0, 1.0).item() == pytest.approx(0.048587, abs=1e-6)
    assert simpo_losses(logps, 2.0, 1.0, 0.2).item() == pytest.approx(0.648587, abs=1e-6)


# ----------------------------------------------------------------------------- naive float64 reference


def naive_losses(
    kind: LossType,
    pc: list[float],
    pr: list[float],
    rc: list[float],
    rr: list[float],
    nc: list[float],
    nr: list[float],
    beta: float,
    eps: float,
    gamma: float,
) -> list[float]:
    """Each formula written per element in pure python (float64)."""
    out = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if kind is LossType.SIGMOID:
            out.append((1 - eps) * softplus(-beta * h) + eps * softplus(beta * h))
        elif kind is LossType.HINGE:
            out.append(max(0.0, 1 - beta * h))
        elif kind is LossType.IPO:
            hn = (pc[i] / nc[i] - rc[i] / nc[i]) - (pr[i] / nr[i] - rr[i] / nr[i])
            out.append((hn - 1 / (2 * beta)) ** 2)
        elif kind is LossType.ROBUST:
            z = beta * h
            out.append(((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps))
        else:
            z = beta * (pc[i] / nc[i] - pr[i] / nr[i]) - gamma
            out.append((1 - eps) * softplus(-z) + eps * softplus(z))
    return out


@pytest.mark.parametrize("kind", list(LossType))
def test_variants_match_naive_float64_reference(kind: LossType) -> None:
    gen = torch.Generator().manual_seed(1234)
    b = 32
    pc, pr, rc, rr = (-50 * torch.rand(b, generator=gen, dtype=torch.float64) for _ in range(4))
    nc, nr = (torch.randint(1, 40, (b,), generator=gen) for _ in range(2))
    config = LossConfig(kind, beta=0.3, label_smoothing=0.2, simpo_gamma=0.7)
    logps = PreferenceLogps(pc, pr, rc, rr, nc, nr)
    got = LOSS_FUNCTIONS[kind](logps, config)
    ref = naive_losses(
        kind, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), nc.tolist(), nr.tolist(),
        0.3, 0.2, 0.7,
    )  # fmt: skip
    assert got.shape == (b,) and got.dtype == torch.float64
    torch.testing.assert_close(got, t64(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("fn", "name"),
    [
        (lambda p: ipo_losses(p, 0.1), "ipo"),
        (lambda p: simpo_losses(p, 0.1, 0.5), "simpo"),
        (lambda p: preference_loss(p, LossConfig("ipo")), "ipo"),  # type: ignore[arg-type]
        (lambda p: preference_loss(p, LossConfig(LossType.SIMPO)), "simpo"),
    ],
)
def test_length_normalised_losses_require_lengths(
    fn: Callable[[PreferenceLogps], object], name: str
) -> None:
    with pytest.raises(ValueError, match=f"{name} is length-normalised"):
        fn(PreferenceLogps(torch.zeros(2), torch.zeros(2)))


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda p: sigmoid_losses(p, 0.0), "beta"),
        (lambda p: hinge_losses(p, -1.0), "beta"),
        (lambda p: ipo_losses(p, math.nan), "beta"),
        (lambda p: robust_losses(p, math.inf, 0.1), "beta"),
        (lambda p: simpo_losses(p, True, 0.5), "beta"),  # type: ignore[arg-type]
        (lambda p: sigmoid_losses(p, 0.1, -0.1), "label_smoothing"),
        (lambda p: sigmoid_losses(p, 0.1, 0.6), "label_smoothing"),
        (lambda p: robust_losses(p, 0.1, 0.5), "label_smoothing"),
        (lambda p: robust_losses(p, 0.1, math.nan), "label_smoothing"),
        (lambda p: simpo_losses(p, 0.1, math.inf), "gamma"),
    ],
)
def test_variant_argument_validation(fn: Callable[[PreferenceLogps], object], match: str) -> None:
    ones = torch.ones(2)
    with pytest.raises(ValueError, match=match):
        fn(PreferenceLogps(ones, ones, chosen_lengths=ones, rejected_lengths=ones))


def test_variant_gradients_flow_to_policy_only_direction() -> None:
    """Every variant pushes π_c up and π_r down where its loss is not flat."""
    for kind in LossType:
        pc = torch.tensor([-3.0, -6.0], requires_grad=True)
        pr = torch.tensor([-3.0, -4.0], requires_grad=True)
        logps = PreferenceLogps(pc, pr, torch.tensor([-3.0, -5.0]), torch.tensor([-3.0, -5.0]),
                                torch.tensor([2, 3]), torch.tensor([2, 4]))  # fmt: skip
        preference_loss(logps, LossConfig(kind, label_smoothing=0.1)).loss.backward()
        assert pc.grad is not None and pr.grad is not None
        assert bool((pc.grad < 0).all()), kind
        assert bool((pr.grad > 0).all()), kind


# ----------------------------------------------------------------------------- config


def test_loss_type_values_and_mapping() -> None:
    assert [t.value for t in LossType] == ["sigmoid", "hinge", "ipo", "robust", "simpo"]
    assert set(LOSS_FUNCTIONS) == set(LossType)
    assert LossType("ipo") is LossType.IPO and LossType.IPO == "ipo"


def test_loss_config_defaults_and_coercion() -> None:
    config = LossConfig()
    assert (config.loss_type, config.beta, config.label_smoothing, config.simpo_gamma) == (
        LossType.SIGMOID, 0.1, 0.0, 0.5,
    )  # fmt: skip
    assert LossConfig("robust").loss_type is LossType.ROBUST  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        config.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "kto"}, "loss_type"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"beta": math.inf}, "beta"),
        ({"beta": True}, "beta"),
        ({"label_smoothing": -0.01}, "label_smoothing"),
        ({"label_smoothing": 0.51}, "label_smoothing"),
        ({"loss_type": LossType.ROBUST, "label_smoothing": 0.5}, "label_smoothing"),
        ({"simpo_gamma": -0.1}, "simpo_gamma"),
        ({"simpo_gamma": math.nan}, "simpo_gamma"),
    ],
)
def test_loss_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)  # type: ignore[arg-type]


def test_sigmoid_allows_half_smoothing_but_robust_does_not() -> None:
    assert LossConfig(label_smoothing=0.5).label_smoothing == 0.5
    assert LossConfig(LossType.ROBUST, label_smoothing=0.49).label_smoothing == 0.49


# ----------------------------------------------------------------------------- preference_loss


def test_reference_free_sigmoid_equals_seed_exactly() -> None:
    c, r = torch.tensor(SEED_CHOSEN), torch.tensor(SEED_REJECTED)
    out = preference_loss(PreferenceLogps(c, r), LossConfig(beta=0.1))
    assert torch.equal(out.loss, dpo_loss(c, r, 0.1))


def test_preference_loss_outputs_with_reference() -> None:
    """β = 0.5; π = (−1, −2), (−4, −1); ρ = (−1.5, −1.5), (−2, −2).
    rewards_c = 0.5·(−1 + 1.5) = 0.25, 0.5·(−4 + 2) = −1.0;
    rewards_r = 0.5·(−2 + 1.5) = −0.25, 0.5·(−1 + 2) = 0.5;
    margins = 0.5, −1.5; accuracies = 1, 0; losses = softplus(−0.5), softplus(1.5)."""
    pc = t64([-1.0, -4.0]).requires_grad_()
    logps = PreferenceLogps(pc, t64([-2.0, -1.0]), t64([-1.5, -2.0]), t64([-1.5, -2.0]))
    out = preference_loss(logps, LossConfig(beta=0.5))
    torch.testing.assert_close(out.rewards_chosen, t64([0.25, -1.0]))
    torch.testing.assert_close(out.rewards_rejected, t64([-0.25, 0.5]))
    torch.testing.assert_close(out.margins, t64([0.5, -1.5]))
    torch.testing.assert_close(out.accuracies, t64([1.0, 0.0]))
    torch.testing.assert_close(out.losses, t64([softplus(-0.5), softplus(1.5)]))
    assert out.loss.item() == pytest.approx((softplus(-0.5) + softplus(1.5)) / 2, rel=1e-12)
    assert out.loss.requires_grad and out.losses.requires_grad
    assert not out.rewards_chosen.requires_grad and not out.margins.requires_grad

    metrics = dpo_metrics(out, logps)
    assert metrics == pytest.approx(
        {
            "rewards/chosen": -0.375,
            "rewards/rejected": 0.125,
            "rewards/margins": -0.5,
            "rewards/accuracies": 0.5,
            "logps/chosen": -2.5,
            "logps/rejected": -1.5,
        }
    )
    assert all(type(v) is float for v in metrics.values())


def test_accuracy_is_strict() -> None:
    """Equal rewards count as wrong (TRL: chosen > rejected)."""
    out = preference_loss(PreferenceLogps(t64([-1.0]), t64([-1.0])), LossConfig())
    assert out.accuracies.tolist() == [0.0]


def test_ipo_and_simpo_rewards_are_length_normalised() -> None:
    """n_c = 4, n_r = 3, β = 0.5. IPO with ρ_c = −8, ρ_r = −3: rewards
    0.5·(−4/4 + 8/4) = 0.5, 0.5·(−9/3 + 3/3) = −1.0. SimPO ignores ρ: 0.5·(−1) = −0.5,
    0.5·(−3) = −1.5."""
    logps = PreferenceLogps(t64([-4.0]), t64([-9.0]), t64([-8.0]), t64([-3.0]),
                            torch.tensor([4]), torch.tensor([3]))  # fmt: skip
    ipo = preference_loss(logps, LossConfig(LossType.IPO, beta=0.5))
    assert (ipo.rewards_chosen.item(), ipo.rewards_rejected.item()) == (0.5, -1.0)
    assert ipo.loss.item() == pytest.approx(4.0)  # (h̄ − 1/(2β))² = (3 − 1)², see test_ipo_by_hand
    simpo = preference_loss(logps, LossConfig(LossType.SIMPO, beta=0.5))
    assert (simpo.rewards_chosen.item(), simpo.rewards_rejected.item()) == (-0.5, -1.5)
    assert simpo.margins.item() == 1.0 and simpo.accuracies.item() == 1.0


def test_hinge_and_robust_rewards_use_summed_logps() -> None:
    logps = PreferenceLogps(t64([-4.0]), t64([-9.0]), chosen_lengths=torch.tensor([4]),
                            rejected_lengths=torch.tensor([3]))  # fmt: skip
    for kind in (LossType.HINGE, LossType.ROBUST):
        out = preference_loss(logps, LossConfig(kind, beta=0.5))
        assert (out.rewards_chosen.item(), out.rewards_rejected.item()) == (-2.0, -4.5)
