"""Composed losses (TRL's ``loss_type`` list + ``loss_weights``) and the SFT / RPO term.

Everything is checked against a reference written here in plain Python floats (float64), one
formula per term, independent of the library's code.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modern_llm.alignment.composed_loss import (
    ComposedLossConfig,
    ComposedOutput,
    LossTerm,
    composed_metrics,
    composed_preference_loss,
    losses_of_term,
)
from modern_llm.alignment.dpo_loss import (
    LossConfig,
    LossType,
    PreferenceLogps,
    preference_loss,
    sft_losses,
)

TERMS = [t.value for t in LossTerm]


def softplus(x: float) -> float:
    """``log(1 + e^x)``, stable; ``−log σ(z) = softplus(−z)``."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def ref_term(term: str, pc, pr, rc, rr, nc, nr, beta, eps, gamma) -> list[float]:  # type: ignore[no-untyped-def]
    """One term's per-pair losses, written from the papers' formulas in Python floats."""
    out = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if term == "sigmoid":
            out.append((1 - eps) * softplus(-beta * h) + eps * softplus(beta * h))
        elif term == "hinge":
            out.append(max(0.0, 1 - beta * h))
        elif term == "ipo":
            hn = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
            out.append((hn - 1 / (2 * beta)) ** 2)
        elif term == "robust":
            z = beta * h
            out.append(((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps))
        elif term == "simpo":
            z = beta * (pc[i] / nc[i] - pr[i] / nr[i]) - gamma
            out.append((1 - eps) * softplus(-z) + eps * softplus(z))
        elif term == "sft":
            out.append(-pc[i] / nc[i])  # mean NLL per chosen token, per pair
        else:
            raise AssertionError(term)
    return out


def ref_rewards(term: str | None, pc, pr, rc, rr, nc, nr, beta) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """β(π − ρ) on the log-probs the reward term uses (summed for sigmoid and sft-only)."""
    b = len(pc)
    if term == "simpo":
        return [beta * pc[i] / nc[i] for i in range(b)], [beta * pr[i] / nr[i] for i in range(b)]
    if term == "ipo":
        return (
            [beta * (pc[i] - rc[i]) / nc[i] for i in range(b)],
            [beta * (pr[i] - rr[i]) / nr[i] for i in range(b)],
        )
    return [beta * (pc[i] - rc[i]) for i in range(b)], [beta * (pr[i] - rr[i]) for i in range(b)]


def t64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def random_inputs(b: int, seed: int) -> tuple[list[float], ...]:
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (
        (-40 * torch.rand(b, generator=g, dtype=torch.float64)).tolist() for _ in range(4)
    )
    nc, nr = (torch.randint(1, 30, (b,), generator=g).tolist() for _ in range(2))
    return pc, pr, rc, rr, nc, nr


def logps_of(pc, pr, rc, rr, nc, nr, grad: bool = False) -> PreferenceLogps:  # type: ignore[no-untyped-def]
    return PreferenceLogps(
        t64(pc).requires_grad_(grad), t64(pr).requires_grad_(grad), t64(rc), t64(rr),
        torch.tensor(nc), torch.tensor(nr),
    )  # fmt: skip


# ----------------------------------------------------------------------------- the sft term


def test_sft_hand_computed_and_differs_from_trl_token_weighting() -> None:
    """π_c = [−6, −3] over n_c = [3, 1] tokens: per pair 6/3 = 2 and 3/1 = 3, mean 2.5.
    TRL's token-weighted batch NLL would be (6 + 3) / (3 + 1) = 2.25; the two agree only when
    all chosen lengths are equal. Rejected and reference log-probs play no part."""
    logps = PreferenceLogps(
        t64([-6.0, -3.0]), t64([-1.0, -100.0]), t64([5.0, 7.0]), t64([0.0, 1.0]),
        torch.tensor([3, 1]), torch.tensor([9, 2]),
    )  # fmt: skip
    losses = sft_losses(logps)
    assert losses.tolist() == [2.0, 3.0]
    assert float(losses.mean()) == 2.5 != (6 + 3) / (3 + 1)
    same_len = PreferenceLogps(t64([-6.0, -3.0]), t64([0.0, 0.0]), chosen_lengths=torch.tensor([3, 3]),
                               rejected_lengths=torch.tensor([1, 1]))  # fmt: skip
    assert float(sft_losses(same_len).mean()) == pytest.approx((6 + 3) / (3 + 3))


def test_sft_requires_lengths_and_pushes_only_chosen_up() -> None:
    with pytest.raises(ValueError, match="sft is length-normalised"):
        sft_losses(PreferenceLogps(torch.zeros(2), torch.zeros(2)))
    pc = torch.tensor([-4.0, -2.0], requires_grad=True)
    pr = torch.tensor([-1.0, -1.0], requires_grad=True)
    logps = PreferenceLogps(pc, pr, chosen_lengths=torch.tensor([2, 4]),
                            rejected_lengths=torch.tensor([1, 1]))  # fmt: skip
    sft_losses(logps).mean().backward()
    assert pc.grad is not None and pc.grad.tolist() == [-0.25, -0.125]  # −1/(B·n_c)
    assert pr.grad is None or bool((pr.grad == 0).all())


def test_term_names_extend_loss_type_with_sft_only() -> None:
    """``sft`` is a composition term, not a single ``LossType`` (the service's single
    ``loss_type`` field, built on ``LossType``, keeps its five values)."""
    assert [t.value for t in LossType] == ["sigmoid", "hinge", "ipo", "robust", "simpo"]
    assert [*(t.value for t in LossType), "sft"] == TERMS
    assert [t for t in LossTerm if not t.is_preference] == [LossTerm.SFT]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("term", TERMS)
def test_each_term_matches_float64_reference(term: str) -> None:
    pc, pr, rc, rr, nc, nr = random_inputs(24, seed=5)
    config = ComposedLossConfig([term], beta=0.3, label_smoothing=0.2, simpo_gamma=0.7)
    got = losses_of_term(logps_of(pc, pr, rc, rr, nc, nr), LossTerm(term), config)
    ref = ref_term(term, pc, pr, rc, rr, nc, nr, 0.3, 0.2, 0.7)
    assert got.shape == (24,) and got.dtype == torch.float64
    torch.testing.assert_close(got, t64(ref), rtol=1e-12, atol=1e-12)


COMPOSITIONS = [
    (["sigmoid", "sft"], [1.0, 0.5]),  # RPO
    (["sft", "ipo"], [2.0, 0.25]),  # rewards from ipo, the first preference term
    (["hinge", "robust", "simpo", "sft"], [0.3, 0.0, 1.7, 1.0]),  # a zero weight
    (["sft"], [3.0]),  # sft alone: sigmoid-style rewards
    (["simpo", "sigmoid"], None),  # default weights 1.0
]


@pytest.mark.parametrize(("terms", "weights"), COMPOSITIONS)
def test_composition_matches_float64_reference(
    terms: list[str], weights: list[float] | None
) -> None:
    pc, pr, rc, rr, nc, nr = random_inputs(16, seed=len(terms))
    beta, eps, gamma = 0.2, 0.1, 0.4
    config = ComposedLossConfig(terms, weights, beta=beta, label_smoothing=eps, simpo_gamma=gamma)
    out = composed_preference_loss(logps_of(pc, pr, rc, rr, nc, nr), config)
    ws = weights or [1.0] * len(terms)
    per_term = {t: ref_term(t, pc, pr, rc, rr, nc, nr, beta, eps, gamma) for t in terms}
    total = [sum(w * per_term[t][i] for t, w in zip(terms, ws, strict=True)) for i in range(16)]
    torch.testing.assert_close(out.losses, t64(total), rtol=1e-12, atol=1e-12)
    assert float(out.loss) == pytest.approx(sum(total) / 16, rel=1e-12, abs=1e-12)
    assert list(out.term_losses) == terms and out.weights == dict(zip(terms, ws, strict=True))
    for t in terms:
        torch.testing.assert_close(out.term_losses[t], t64(per_term[t]), rtol=1e-12, atol=1e-12)
        assert float(out.term_means[t]) == pytest.approx(sum(per_term[t]) / 16, rel=1e-12)
    reward_term = next((t for t in terms if t != "sft"), None)
    chosen, rejected = ref_rewards(reward_term, pc, pr, rc, rr, nc, nr, beta)
    torch.testing.assert_close(out.rewards_chosen, t64(chosen), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rewards_rejected, t64(rejected), rtol=1e-12, atol=1e-12)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    torch.testing.assert_close(out.margins, t64(margins), rtol=1e-12, atol=1e-12)
    assert out.accuracies.tolist() == [1.0 if m > 0 else 0.0 for m in margins]


def test_rpo_hand_computed() -> None:
    """h = 0 for both pairs, so sigmoid is log 2 each; sft is 6/3 = 2 and 3/1 = 3. With weights
    [1, 0.5]: per pair log 2 + 1 and log 2 + 1.5, mean log 2 + 1.25. Rewards β(π − ρ) with
    β = 0.5: chosen [−3, −1.5], rejected the same (accuracy 0: ties are not wins)."""
    logps = PreferenceLogps(
        t64([-6.0, -3.0]), t64([-6.0, -3.0]), chosen_lengths=torch.tensor([3, 1]),
        rejected_lengths=torch.tensor([5, 5]),
    )  # fmt: skip
    out = composed_preference_loss(logps, ComposedLossConfig(["sigmoid", "sft"], [1, 0.5], 0.5))
    assert out.losses.tolist() == pytest.approx([math.log(2) + 1, math.log(2) + 1.5])
    assert float(out.loss) == pytest.approx(math.log(2) + 1.25)
    assert out.rewards_chosen.tolist() == [-3.0, -1.5] == out.rewards_rejected.tolist()
    assert out.accuracies.tolist() == [0.0, 0.0]
    metrics = composed_metrics(out, logps)
    assert metrics["loss/sigmoid"] == pytest.approx(math.log(2))
    assert metrics["loss/sft"] == pytest.approx(2.5)
    assert metrics["logps/chosen"] == -4.5 and metrics["rewards/accuracies"] == 0.0


# ----------------------------------------------------------------------------- properties

_finite = st.floats(-200, 0, allow_nan=False, allow_infinity=False)
_weight = st.floats(0, 5, allow_nan=False, allow_infinity=False)


@st.composite
def problems(draw: st.DrawFn) -> tuple[PreferenceLogps, list[str], list[float]]:
    b = draw(st.integers(1, 6))
    pc, pr, rc, rr = (draw(st.lists(_finite, min_size=b, max_size=b)) for _ in range(4))
    nc, nr = (draw(st.lists(st.integers(1, 50), min_size=b, max_size=b)) for _ in range(2))
    terms = draw(st.lists(st.sampled_from(TERMS), min_size=1, max_size=6, unique=True))
    weights = draw(st.lists(_weight, min_size=len(terms), max_size=len(terms)))
    if not any(w > 0 for w in weights):
        weights[0] = 1.0
    return logps_of(pc, pr, rc, rr, nc, nr, grad=True), terms, weights


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0.01, 4, allow_nan=False, allow_infinity=False))
def test_total_is_linear_in_the_weights(
    problem: tuple[PreferenceLogps, list[str], list[float]], scale: float
) -> None:
    """L(w) = Σ_k w_k · mean(ℓ_k), and L(c·w) = c·L(w)."""
    logps, terms, weights = problem
    out = composed_preference_loss(logps, ComposedLossConfig(terms, weights))
    expected = sum(
        w * float(out.term_means[t].detach()) for t, w in zip(terms, weights, strict=True)
    )
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    scaled = composed_preference_loss(
        logps, ComposedLossConfig(terms, [scale * w for w in weights])
    )
    assert float(scaled.loss.detach()) == pytest.approx(
        scale * float(out.loss.detach()), rel=1e-9, abs=1e-9
    )


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(list(LossType)))
def test_single_term_of_weight_one_is_preference_loss(
    problem: tuple[PreferenceLogps, list[str], list[float]], kind: LossType
) -> None:
    """Bit for bit: loss, losses, rewards, margins, accuracies."""
    logps = problem[0]
    config = LossConfig(kind, beta=0.3, label_smoothing=0.1)
    want = preference_loss(logps, config)
    for got in (
        composed_preference_loss(logps, config),
        composed_preference_loss(logps, ComposedLossConfig([kind.value], [1.0], 0.3, 0.1)),
    ):
        for name in (
            "loss",
            "losses",
            "rewards_chosen",
            "rewards_rejected",
            "margins",
            "accuracies",
        ):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


@settings(max_examples=40, deadline=None)
@given(problems())
def test_gradient_of_total_is_weighted_sum_of_term_gradients(
    problem: tuple[PreferenceLogps, list[str], list[float]],
) -> None:
    logps, terms, weights = problem
    config = ComposedLossConfig(terms, weights)
    inputs = (logps.policy_chosen, logps.policy_rejected)
    got = torch.autograd.grad(
        composed_preference_loss(logps, config).loss, inputs, allow_unused=True
    )
    expected = [torch.zeros_like(x) for x in inputs]
    for term, w in zip(terms, weights, strict=True):
        mean = losses_of_term(logps, LossTerm(term), config).mean()
        for acc, g in zip(
            expected, torch.autograd.grad(mean, inputs, allow_unused=True), strict=True
        ):
            if g is not None:
                acc.add_(w * g)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(
            torch.zeros_like(e) if g is None else g, e, rtol=1e-9, atol=1e-12
        )


def test_zero_weight_term_adds_nothing_even_when_infinite() -> None:
    """A weight-0 term is reported but kept out of the total (0 · ∞ would be NaN): with
    π_r = −∞, ipo's (h̄ − 1/(2β))² is +∞; sft alone (2 / 1) makes the total."""
    logps = PreferenceLogps(t64([-2.0]), t64([-math.inf]), chosen_lengths=torch.tensor([1]),
                            rejected_lengths=torch.tensor([1]))  # fmt: skip
    out = composed_preference_loss(logps, ComposedLossConfig(["sft", "ipo"], [1.0, 0.0]))
    assert math.isinf(float(out.term_means["ipo"]))
    assert float(out.loss) == 2.0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": []}, r"^loss_type must name at least one term"),
        ({"loss_type": ["sigmoid", "dpo"]}, r"^loss_type\[1\] must be one of sigmoid, .*sft"),
        ({"loss_type": ["sft", "ipo", "sft"]}, r"^loss_type\[2\]: duplicate term 'sft'"),
        ({"loss_type": [1]}, r"^loss_type\[0\] must be one of"),
        ({"loss_type": 3}, r"^loss_type must be a name or a list"),
        (
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]},
            r"^loss_weights must have one weight per loss_type term \(2\), got 1",
        ),
        ({"loss_weights": [math.nan]}, r"^loss_weights\[0\] must be a finite number"),
        ({"loss_weights": [math.inf]}, r"^loss_weights\[0\] must be a finite number"),
        ({"loss_weights": [True]}, r"^loss_weights\[0\] must be a finite number"),
        ({"loss_weights": ["1"]}, r"^loss_weights\[0\] must be a finite number"),
        ({"loss_weights": [-0.5]}, r"^loss_weights\[0\] must be >= 0"),
        (
            {"loss_type": ["sft", "hinge"], "loss_weights": [0, 0.0]},
            r"^loss_weights must have at least one weight > 0",
        ),
        ({"loss_weights": "1"}, r"^loss_weights must be a list of numbers"),
        ({"beta": 0.0}, r"^beta must be > 0"),
        ({"loss_type": ["sft"], "beta": -1.0}, r"^beta must be > 0"),  # rewards still use β
        (
            {"loss_type": ["sft", "robust"], "label_smoothing": 0.5},
            r"^label_smoothing must be in \[0, 0.5\)",
        ),
        ({"loss_type": ["simpo"], "simpo_gamma": -1.0}, r"^simpo_gamma must be >= 0"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ComposedLossConfig(**kwargs)  # type: ignore[arg-type]


def test_config_normalises_names_and_weights() -> None:
    config = ComposedLossConfig("ipo")
    assert config.terms == (LossTerm.IPO,) and config.weights == (1.0,)
    config = ComposedLossConfig([LossType.SIGMOID, LossTerm.SFT, "hinge"], (1, 0, 2))
    assert config.terms == (LossTerm.SIGMOID, LossTerm.SFT, LossTerm.HINGE)
    assert config.weights == (1.0, 0.0, 2.0) and config.reward_term is LossTerm.SIGMOID
    assert ComposedLossConfig(["sft"]).reward_term is None
    single = ComposedLossConfig.from_loss_config(LossConfig(LossType.ROBUST, 0.3, 0.2, 0.1))
    assert (single.terms, single.weights, single.beta) == ((LossTerm.ROBUST,), (1.0,), 0.3)
    assert (single.label_smoothing, single.simpo_gamma) == (0.2, 0.1)
    with pytest.raises(AttributeError):
        config.beta = 1.0  # type: ignore[misc]


def test_length_normalised_terms_require_lengths() -> None:
    logps = PreferenceLogps(torch.zeros(2), torch.zeros(2))
    for terms in (["sigmoid", "sft"], ["ipo"], ["hinge", "simpo"]):
        bad = terms[-1]
        with pytest.raises(ValueError, match=f"{bad} is length-normalised"):
            composed_preference_loss(logps, ComposedLossConfig(terms))
    out = composed_preference_loss(logps, ComposedLossConfig(["sigmoid", "hinge"]))
    assert isinstance(out, ComposedOutput) and float(out.loss) == pytest.approx(math.log(2) + 1)
