"""Weighted sums of loss terms: TRL's ``loss_type`` list with ``loss_weights``.

A composed loss is ``ℓ_i = Σ_k w_k · ℓ_k,i`` per pair, and ``L = mean_i ℓ_i = Σ_k w_k ·
mean_i ℓ_k,i`` (TRL sums ``w_k · mean(ℓ_k)``: the same number). Each term is one of the
per-pair functions of :mod:`modern_llm.alignment.dpo_loss` (one function per formula), named
by :class:`LossTerm`: the preference losses of :class:`~modern_llm.alignment.dpo_loss.LossType`
plus ``sft`` (:func:`~modern_llm.alignment.dpo_loss.sft_losses`, the RPO term). TRL's
``rpo_alpha=α`` is ``loss_type=["sigmoid", "sft"], loss_weights=[1, α]``.

``sft`` is not a :class:`LossType`: it does not compare chosen with rejected, so it is only
offered as a term of a composition (and the service's single ``loss_type`` field keeps its
five values until it accepts a list).

    config = ComposedLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1)
    out = composed_preference_loss(logps, config)
    out.loss.backward()              # steps on the weighted total
    out.term_means["sft"]            # each term's batch mean, unweighted
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from numbers import Real

from torch import Tensor

from modern_llm.alignment.dpo_loss import (
    LOSS_FUNCTIONS,
    LossConfig,
    LossOutput,
    LossType,
    PreferenceLogps,
    dpo_metrics,
    preference_loss,
    sft_losses,
)

__all__ = [
    "ComposedLossConfig",
    "ComposedOutput",
    "LossTerm",
    "composed_metrics",
    "composed_preference_loss",
    "losses_of_term",
]


class LossTerm(str, Enum):
    """Names of the terms a composed loss may hold, as TRL spells them."""

    SIGMOID = "sigmoid"
    HINGE = "hinge"
    IPO = "ipo"
    ROBUST = "robust"
    SIMPO = "simpo"
    SFT = "sft"

    @property
    def is_preference(self) -> bool:
        """Whether the term compares chosen with rejected (every term but ``sft``)."""
        return self is not LossTerm.SFT


def _terms(value: object) -> tuple[LossTerm, ...]:
    """``loss_type`` as a non-empty tuple of distinct terms (a single name is one term)."""
    names: list[object]
    if isinstance(value, (str, LossTerm, LossType)):
        names = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        names = list(value)
    else:
        raise ValueError(f"loss_type must be a name or a list of names, got {type(value).__name__}")
    if not names:
        raise ValueError("loss_type must name at least one term")
    allowed = ", ".join(t.value for t in LossTerm)
    terms: list[LossTerm] = []
    for i, name in enumerate(names):
        raw = name.value if isinstance(name, Enum) else name
        if not isinstance(raw, str) or raw not in {t.value for t in LossTerm}:
            raise ValueError(f"loss_type[{i}] must be one of {allowed}, got {name!r}")
        term = LossTerm(raw)
        if term in terms:
            raise ValueError(f"loss_type[{i}]: duplicate term {term.value!r}")
        terms.append(term)
    return tuple(terms)


def _weights(value: object, n_terms: int) -> tuple[float, ...]:
    """``loss_weights`` as a tuple of finite floats ``≥ 0``, one per term, at least one ``> 0``;
    ``None`` is 1.0 for every term (TRL's default)."""
    if value is None:
        return (1.0,) * n_terms
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"loss_weights must be a list of numbers, got {type(value).__name__}")
    if len(value) != n_terms:
        raise ValueError(
            f"loss_weights must have one weight per loss_type term ({n_terms}), got {len(value)}"
        )
    weights = []
    for i, w in enumerate(value):
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)):
            raise ValueError(f"loss_weights[{i}] must be a finite number, got {w!r}")
        if float(w) < 0:
            raise ValueError(f"loss_weights[{i}] must be >= 0, got {float(w)}")
        weights.append(float(w))
    if not any(w > 0 for w in weights):
        raise ValueError("loss_weights must have at least one weight > 0")
    return tuple(weights)


@dataclass(frozen=True)
class ComposedLossConfig:
    """Terms, their weights and the shared hyper-parameters; validated on construction.

    ``loss_type`` is one name or a sequence of names (``LossTerm`` / ``LossType`` members or
    their strings) and is stored as a tuple of :class:`LossTerm`; ``loss_weights`` (``None``:
    1.0 each, as TRL) is stored as a tuple of floats. ``beta``, ``label_smoothing`` and
    ``simpo_gamma`` mean what they mean in :class:`~modern_llm.alignment.dpo_loss.LossConfig`
    and are checked by it for every preference term (so ``robust`` needs ε < 0.5).

    Raises:
        ValueError: the message starts with the field it is about (``loss_type``,
            ``loss_type[i]``, ``loss_weights``, ``loss_weights[i]``, ``beta``, ...).
    """

    loss_type: tuple[LossTerm, ...] | Sequence[str] | str = (LossTerm.SIGMOID,)
    loss_weights: tuple[float, ...] | Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self) -> None:
        terms = _terms(self.loss_type)
        object.__setattr__(self, "loss_type", terms)
        object.__setattr__(self, "loss_weights", _weights(self.loss_weights, len(terms)))
        for term in (LossTerm.SIGMOID, *(t for t in terms if t.is_preference)):
            self.term_config(term)  # validates beta, label_smoothing, simpo_gamma

    @property
    def terms(self) -> tuple[LossTerm, ...]:
        return self.loss_type  # type: ignore[return-value]  # normalised in __post_init__

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights  # type: ignore[return-value]  # normalised in __post_init__

    @property
    def reward_term(self) -> LossTerm | None:
        """The term rewards are reported for: the first preference term (None if only sft)."""
        return next((t for t in self.terms if t.is_preference), None)

    def term_config(self, term: LossTerm) -> LossConfig:
        """The single-loss config of a preference term (sigmoid stands in for ``sft``)."""
        loss_type = LossType(term.value) if term.is_preference else LossType.SIGMOID
        return LossConfig(loss_type, self.beta, self.label_smoothing, self.simpo_gamma)

    @classmethod
    def from_loss_config(cls, config: LossConfig) -> ComposedLossConfig:
        """One term of weight 1: ``composed_preference_loss`` then equals ``preference_loss``."""
        return cls(
            (LossTerm(config.loss_type.value),), None, config.beta, config.label_smoothing,
            config.simpo_gamma,
        )  # fmt: skip


def losses_of_term(logps: PreferenceLogps, term: LossTerm, config: ComposedLossConfig) -> Tensor:
    """Per-pair losses ``(B,)`` of one term, unweighted."""
    if term is LossTerm.SFT:
        return sft_losses(logps)
    sub = config.term_config(term)
    return LOSS_FUNCTIONS[sub.loss_type](logps, sub)


@dataclass
class ComposedOutput(LossOutput):
    """``LossOutput`` of the weighted total, plus every term on its own.

    ``loss`` / ``losses`` are the weighted total (mean / per pair, differentiable). Rewards,
    margins and accuracies are those of the first preference term (as ``preference_loss``
    reports them for it); with ``sft`` alone, ``β(π − ρ)`` on summed log-probs (sigmoid's).
    Dicts are keyed by term name, in ``config`` order.
    """

    term_losses: dict[str, Tensor]  # (B,) per term, unweighted, differentiable
    term_means: dict[str, Tensor]  # () per term: mean of term_losses, differentiable
    weights: dict[str, float]


def composed_preference_loss(
    logps: PreferenceLogps, config: ComposedLossConfig | LossConfig
) -> ComposedOutput:
    """Every term of ``config``, their weighted per-pair sum and its mean.

    With a single term of weight 1 (or a :class:`LossConfig`), every field equals
    ``preference_loss(logps, config)``'s. Terms of weight 0 are still computed and reported
    (they add nothing to the total or its gradient).
    """
    if isinstance(config, LossConfig):
        config = ComposedLossConfig.from_loss_config(config)
    reward_term = config.reward_term
    head = preference_loss(logps, config.term_config(reward_term or LossTerm.SIGMOID))
    per_term: dict[str, Tensor] = {}
    total: Tensor | None = None
    for term, weight in zip(config.terms, config.weights, strict=True):
        losses = head.losses if term is reward_term else losses_of_term(logps, term, config)
        per_term[term.value] = losses
        if weight == 0.0:
            continue  # reported, but kept out of the total (0 · ∞ would be NaN)
        total = weight * losses if total is None else total + weight * losses  # (B,)
    assert total is not None  # validation: at least one weight > 0
    return ComposedOutput(
        loss=total.mean(),
        losses=total,
        rewards_chosen=head.rewards_chosen,
        rewards_rejected=head.rewards_rejected,
        margins=head.margins,
        accuracies=head.accuracies,
        term_losses=per_term,
        term_means={name: losses.mean() for name, losses in per_term.items()},
        weights={t.value: w for t, w in zip(config.terms, config.weights, strict=True)},
    )


def composed_metrics(output: ComposedOutput, logps: PreferenceLogps) -> dict[str, float]:
    """``dpo_metrics`` plus ``loss/<term>``: each term's batch mean, unweighted."""
    metrics = dpo_metrics(output, logps)
    for name, value in output.term_means.items():
        metrics[f"loss/{name}"] = float(value.detach().double().item())
    return metrics
