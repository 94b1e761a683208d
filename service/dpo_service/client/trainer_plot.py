"""The remote trainer's plot: loss, reward margin and accuracy per optimizer step (raw and a
moving average), with the held-out evaluations on the same axes (needs matplotlib, in the
``trainer`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["moving_average", "plot"]


def plot(
    history: Sequence[Any],
    path: Path,
    window: int = 5,
    evals: Sequence[Any] = (),
) -> None:
    """Loss, mean reward margin and accuracy over steps (raw and a moving average), with the
    held-out set's values drawn on the same axes. ``history``/``evals``: the trainer's
    ``StepRecord``/``EvalRecord`` (``step``, ``loss``, ``margin``, ``accuracy``; ``pairs``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in history]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, name, key in zip(
        axes, ("loss", "reward margin", "accuracy"), ("loss", "margin", "accuracy"), strict=True
    ):
        values = [getattr(r, key) for r in history]
        ax.plot(steps, values, alpha=0.35, label=f"train {name}")
        ax.plot(steps, moving_average(values, window), label=f"train {name} ({window}-step mean)")
        if evals:
            ax.plot([e.step for e in evals], [getattr(e, key) for e in evals], "o-",
                    label=f"held-out {name} ({evals[-1].pairs} pairs)")  # fmt: skip
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Online DPO through the service")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
