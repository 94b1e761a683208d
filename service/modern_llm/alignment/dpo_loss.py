"""Direct Preference Optimization losses: the seed's ``dpo_loss`` and the TRL variants.

Every loss is its own function with its formula and paper in the docstring. Notation::

    π_c, π_r   policy log-probs of the chosen / rejected response (summed over response tokens)
    ρ_c, ρ_r   reference-policy log-probs (0 when reference-free)
    h          (π_c − ρ_c) − (π_r − ρ_r)                      the implicit reward margin
    x̄          x / n, the log-prob divided by its response token count (length-normalised)

Per-pair functions return ``(B,)`` losses; ``preference_loss`` averages them and reports the
per-pair rewards ``β(π − ρ)`` (detached), margins and accuracies, as TRL does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_FUNCTIONS",
    "LossConfig",
    "LossOutput",
    "LossType",
    "PreferenceLogps",
    "dpo_loss",
    "dpo_metrics",
    "hinge_losses",
    "ipo_losses",
    "preference_loss",
    "robust_losses",
    "sft_losses",
    "sigmoid_losses",
    "simpo_losses",
]


# ----------------------------------------------------------------------------- validation


def _check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float; bools, tensors and non-numbers are rejected."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def _check_beta(beta: object) -> float:
    result = _check_real("beta", beta)
    if result <= 0:
        raise ValueError(f"beta must be > 0, got {result}")
    return result


def _check_smoothing(label_smoothing: object, *, inclusive_half: bool) -> float:
    eps = _check_real("label_smoothing", label_smoothing)
    ok = 0.0 <= eps <= 0.5 if inclusive_half else 0.0 <= eps < 0.5
    if not ok:
        bound = "[0, 0.5]" if inclusive_half else "[0, 0.5)"
        raise ValueError(f"label_smoothing must be in {bound}, got {eps}")
    return eps


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


# ----------------------------------------------------------------------------- seed API


def dpo_loss(chosen_logprobs: Tensor, rejected_logprobs: Tensor, beta: float = 0.1) -> Tensor:
    """Seed DPO loss, reference-free (Rafailov et al. 2023, arXiv:2305.18290).

    ``L = mean(−log σ(β · (chosen − rejected)))`` over **all** elements, so inputs of shape
    ``()``, ``(B,)`` or ``(B, T)`` all work. ``beta`` is a plain number: no gradient flows
    through it; gradients flow to both log-prob tensors.

    Raises:
        ValueError: shapes differ, a tensor is empty or not floating point, or ``beta`` is not
            a finite real number ``> 0`` (bools and tensors are rejected).
    """
    chosen = _check_tensor("chosen_logprobs", chosen_logprobs)
    rejected = _check_tensor("rejected_logprobs", rejected_logprobs)
    if chosen.shape != rejected.shape:
        raise ValueError(
            "chosen_logprobs and rejected_logprobs must have the same shape, got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    if chosen.numel() == 0:
        raise ValueError("chosen_logprobs and rejected_logprobs must not be empty")
    b = _check_beta(beta)
    # logsigmoid is computed stably: finite for any finite input, including ±1e4.
    return -F.logsigmoid(b * (chosen - rejected)).mean()


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-pair sequence log-probs, validated on construction (``ValueError``)."""

    policy_chosen: Tensor  # (B,) summed response log-probs under the policy
    policy_rejected: Tensor  # (B,)
    reference_chosen: Tensor | None = None  # (B,) or None (reference-free)
    reference_rejected: Tensor | None = None  # (B,) or None
    chosen_lengths: Tensor | None = None  # (B,) response token counts, > 0
    rejected_lengths: Tensor | None = None  # (B,)

    def __post_init__(self) -> None:
        chosen = _check_tensor("policy_chosen", self.policy_chosen)
        if chosen.dim() != 1 or chosen.shape[0] == 0:
            raise ValueError(
                f"policy_chosen must have shape (B,) with B >= 1, got {tuple(chosen.shape)}"
            )
        if (self.reference_chosen is None) != (self.reference_rejected is None):
            raise ValueError("give both reference_chosen and reference_rejected, or neither")
        if (self.chosen_lengths is None) != (self.rejected_lengths is None):
            raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
        others = {
            "policy_rejected": self.policy_rejected,
            "reference_chosen": self.reference_chosen,
            "reference_rejected": self.reference_rejected,
        }
        for name, tensor in others.items():
            if tensor is not None and _check_tensor(name, tensor).shape != chosen.shape:
                raise ValueError(
                    f"{name} must have shape {tuple(chosen.shape)} like policy_chosen, "
                    f"got {tuple(tensor.shape)}"
                )
        lengths = {"chosen_lengths": self.chosen_lengths, "rejected_lengths": self.rejected_lengths}
        for name, length in lengths.items():
            if length is None:
                continue
            if not isinstance(length, Tensor) or length.shape != chosen.shape:
                shape = tuple(length.shape) if isinstance(length, Tensor) else type(length).__name__
                raise ValueError(
                    f"{name} must be a tensor of shape {tuple(chosen.shape)}, got {shape}"
                )
            if bool((length <= 0).any()):
                raise ValueError(f"{name} must be positive token counts")

    @property
    def has_reference(self) -> bool:
        return self.reference_chosen is not None

    def margin(self) -> Tensor:
        """``h = (π_c − ρ_c) − (π_r − ρ_r)`` on summed log-probs; ``(B,)``."""
        chosen, rejected = self.log_ratios()
        return chosen - rejected

    def normalised_margin(self, what: str) -> Tensor:
        """``h̄ = (π̄_c − ρ̄_c) − (π̄_r − ρ̄_r)``, log-probs divided by token counts; ``(B,)``."""
        chosen, rejected = self.log_ratios(normalise_for=what)
        return chosen - rejected

    def log_ratios(self, *, normalise_for: str | None = None) -> tuple[Tensor, Tensor]:
        """Per-pair log-ratios ``(π − ρ)`` for chosen and rejected, each ``(B,)``.

        ``ρ = 0`` when reference-free. With ``normalise_for`` (the loss name, for the error
        message) every log-prob is first divided by its response token count.
        """
        pc, pr = self.policy_chosen, self.policy_rejected
        rc, rr = self.reference_chosen, self.reference_rejected
        if normalise_for is not None:
            pc, pr = self.normalise(pc, pr, normalise_for)
            if rc is not None and rr is not None:
                rc, rr = self.normalise(rc, rr, normalise_for)
        if rc is None or rr is None:
            return pc, pr
        return pc - rc, pr - rr

    def normalise(self, chosen: Tensor, rejected: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Divide chosen / rejected log-probs ``(B,)`` by their response token counts."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"{what} is length-normalised: chosen_lengths and rejected_lengths are required"
            )
        return (
            chosen / self.chosen_lengths.to(chosen.dtype),
            rejected / self.rejected_lengths.to(rejected.dtype),
        )


def _smoothed_logsigmoid_losses(logits: Tensor, eps: float) -> Tensor:
    """``−(1−ε)·log σ(z) − ε·log σ(−z)``; exactly ``−log σ(z)`` when ε = 0.  (B,) → (B,)."""
    losses = -F.logsigmoid(logits)
    if eps == 0.0:
        return losses  # bit-identical to the seed's dpo_loss
    return (1.0 - eps) * losses - eps * F.logsigmoid(-logits)


# ----------------------------------------------------------------------------- variants


def sigmoid_losses(logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) with cDPO label smoothing.

    ``ℓ = −(1−ε)·log σ(βh) − ε·log σ(−βh)``. ε > 0 is conservative DPO (Mitchell 2023,
    "A note on DPO with noisy preferences"; TRL ``loss_type="sigmoid"`` with
    ``label_smoothing``); ε = 0 is plain DPO and, without a reference, the seed's ``dpo_loss``.
    ε ∈ [0, 0.5]. Returns ``(B,)``.
    """
    b = _check_beta(beta)
    eps = _check_smoothing(label_smoothing, inclusive_half=True)
    return _smoothed_logsigmoid_losses(b * logps.margin(), eps)  # (B,)


def hinge_losses(logps: PreferenceLogps, beta: float) -> Tensor:
    """SLiC hinge loss (Zhao et al. 2023, arXiv:2305.10425; TRL ``"hinge"``).

    ``ℓ = max(0, 1 − βh)``. Returns ``(B,)``.
    """
    b = _check_beta(beta)
    return torch.relu(1.0 - b * logps.margin())  # (B,)


def ipo_losses(logps: PreferenceLogps, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036; TRL ``"ipo"``).

    ``ℓ = (h̄ − 1/(2β))²`` where, as TRL does, every log-prob (policy and reference) is first
    divided by its response token count: ``h̄ = (π_c/n_c − ρ_c/n_c) − (π_r/n_r − ρ_r/n_r)``.
    Requires ``chosen_lengths`` / ``rejected_lengths`` (``ValueError`` otherwise). Returns ``(B,)``.
    """
    b = _check_beta(beta)
    h = logps.normalised_margin("ipo")  # (B,)
    return (h - 1.0 / (2.0 * b)) ** 2


def robust_losses(logps: PreferenceLogps, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409; TRL ``"robust"``).

    ``ℓ = (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1 − 2ε)``, an unbiased loss under preference
    labels flipped with probability ε ∈ [0, 0.5). Returns ``(B,)``.
    """
    b = _check_beta(beta)
    eps = _check_smoothing(label_smoothing, inclusive_half=False)
    z = b * logps.margin()  # (B,)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def simpo_losses(
    logps: PreferenceLogps, beta: float, gamma: float, label_smoothing: float = 0.0
) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734; TRL ``CPOTrainer`` ``loss_type="simpo"``).

    Reference-free and length-normalised, with target reward margin γ:
    ``z = β(π_c/n_c − π_r/n_r) − γ``, ``ℓ = −(1−ε)·log σ(z) − ε·log σ(−z)``.
    Any reference log-probs in ``logps`` are ignored. Requires lengths. Returns ``(B,)``.
    """
    b = _check_beta(beta)
    g = _check_real("gamma", gamma)
    eps = _check_smoothing(label_smoothing, inclusive_half=True)
    chosen, rejected = logps.normalise(logps.policy_chosen, logps.policy_rejected, "simpo")
    return _smoothed_logsigmoid_losses(b * (chosen - rejected) - g, eps)  # (B,)


def sft_losses(logps: PreferenceLogps) -> Tensor:
    """SFT / RPO term (Pang et al. 2024, arXiv:2404.19733; TRL ``loss_type="sft"``, ``rpo_alpha``).

    ``ℓ = −π_c / n_c``: the chosen response's negative log-likelihood per token, **per pair**
    (the batch loss is then the mean over pairs, as for every other term). TRL instead averages
    the NLL over all chosen tokens of the batch, ``Σ_i −π_c,i / Σ_i n_c,i`` (token-weighted);
    the two agree when every chosen response has the same length. Per pair keeps each pair's
    value independent of the batch it was coalesced into. References and rejected log-probs are
    not used. Requires lengths (``ValueError`` otherwise). Returns ``(B,)``.
    """
    chosen, _ = logps.normalise(logps.policy_chosen, logps.policy_rejected, "sft")
    return -chosen  # (B,)


# ----------------------------------------------------------------------------- config


class LossType(str, Enum):
    """Loss names, as TRL spells them."""

    SIGMOID = "sigmoid"
    HINGE = "hinge"
    IPO = "ipo"
    ROBUST = "robust"
    SIMPO = "simpo"


@dataclass(frozen=True)
class LossConfig:
    """Which loss and its hyper-parameters; validated on construction (``ValueError``).

    ``loss_type`` may be given as its string value (``"ipo"``); it is stored as ``LossType``.
    ``label_smoothing`` is ε ∈ [0, 0.5] (``[0, 0.5)`` for robust) and is used by sigmoid,
    robust and simpo. ``simpo_gamma`` (γ ≥ 0, finite) is used by simpo only.
    """

    loss_type: LossType = LossType.SIGMOID
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self) -> None:
        try:
            loss_type = LossType(self.loss_type)
        except ValueError:
            names = ", ".join(t.value for t in LossType)
            raise ValueError(f"loss_type must be one of {names}, got {self.loss_type!r}") from None
        object.__setattr__(self, "loss_type", loss_type)
        object.__setattr__(self, "beta", _check_beta(self.beta))
        robust = loss_type is LossType.ROBUST
        eps = _check_smoothing(self.label_smoothing, inclusive_half=not robust)
        object.__setattr__(self, "label_smoothing", eps)
        gamma = _check_real("simpo_gamma", self.simpo_gamma)
        if gamma < 0:
            raise ValueError(f"simpo_gamma must be >= 0, got {gamma}")
        object.__setattr__(self, "simpo_gamma", gamma)


LossFunction = Callable[[PreferenceLogps, LossConfig], Tensor]

LOSS_FUNCTIONS: dict[LossType, LossFunction] = {
    LossType.SIGMOID: lambda p, c: sigmoid_losses(p, c.beta, c.label_smoothing),
    LossType.HINGE: lambda p, c: hinge_losses(p, c.beta),
    LossType.IPO: lambda p, c: ipo_losses(p, c.beta),
    LossType.ROBUST: lambda p, c: robust_losses(p, c.beta, c.label_smoothing),
    LossType.SIMPO: lambda p, c: simpo_losses(p, c.beta, c.simpo_gamma, c.label_smoothing),
}


# ----------------------------------------------------------------------------- output


@dataclass
class LossOutput:
    """Scalar loss plus per-pair statistics (all statistics detached)."""

    loss: Tensor  # () mean of losses, differentiable
    losses: Tensor  # (B,) per-pair losses, differentiable
    rewards_chosen: Tensor  # (B,) β(π_c − ρ_c)
    rewards_rejected: Tensor  # (B,) β(π_r − ρ_r)
    margins: Tensor  # (B,) rewards_chosen − rewards_rejected
    accuracies: Tensor  # (B,) 1.0 where rewards_chosen > rewards_rejected (strict), else 0.0


def _reward_logps(logps: PreferenceLogps, loss_type: LossType) -> tuple[Tensor, Tensor]:
    """The log-ratios ``(π − ρ)`` that the loss itself uses, for chosen and rejected, ``(B,)``."""
    if loss_type is LossType.SIMPO:  # reference-free, length-normalised
        return logps.normalise(logps.policy_chosen, logps.policy_rejected, "simpo")
    return logps.log_ratios(normalise_for="ipo" if loss_type is LossType.IPO else None)


def preference_loss(logps: PreferenceLogps, config: LossConfig) -> LossOutput:
    """Per-pair losses of ``config.loss_type``, their mean, and TRL-style rewards.

    Rewards are ``β(π − ρ)`` (detached) on the same log-probs the loss uses: length-normalised
    for ipo and simpo, ρ = 0 when reference-free and always for simpo. With a reference-free
    sigmoid config and ε = 0, ``loss`` equals ``dpo_loss(policy_chosen, policy_rejected, β)``.
    """
    losses = LOSS_FUNCTIONS[config.loss_type](logps, config)  # (B,)
    chosen, rejected = _reward_logps(logps, config.loss_type)  # (B,), (B,)
    rewards_chosen = config.beta * chosen.detach()
    rewards_rejected = config.beta * rejected.detach()
    return LossOutput(
        loss=losses.mean(),
        losses=losses,
        rewards_chosen=rewards_chosen,
        rewards_rejected=rewards_rejected,
        margins=rewards_chosen - rewards_rejected,
        accuracies=(rewards_chosen > rewards_rejected).to(rewards_chosen.dtype),
    )


def dpo_metrics(output: LossOutput, logps: PreferenceLogps) -> dict[str, float]:
    """Batch means under TRL's metric names.

    ``logps/chosen`` and ``logps/rejected`` are the policy log-probs as given (summed, not
    length-normalised).
    """

    def mean(t: Tensor) -> float:
        return float(t.detach().double().mean().item())

    return {
        "rewards/chosen": mean(output.rewards_chosen),
        "rewards/rejected": mean(output.rewards_rejected),
        "rewards/margins": mean(output.margins),
        "rewards/accuracies": mean(output.accuracies),
        "logps/chosen": mean(logps.policy_chosen),
        "logps/rejected": mean(logps.policy_rejected),
    }
