"""The remote trainer's side: stream a preference JSONL to a running service and train it.

    dpo-service train-remote --target grpc://127.0.0.1:50051 --data examples/data/preferences.jsonl \\
        --steps 40 --batch-size 8 --plot out/remote_dpo.png

Reads ``{"prompt", "chosen", "rejected"}`` lines, sends batches as train requests over gRPC or
HTTP with the package's client (jittered backoff on 429/503/RESOURCE_EXHAUSTED/UNAVAILABLE,
deadlines, and a ``request_id`` per step so a retry never applies a step twice), shows a
progress bar (loss, accuracy, margin, pairs/s), asks the service for a checkpoint at the end,
and writes a PNG plot of loss, reward margin and accuracy over steps plus the history as JSON.

The API key comes from ``DPO_TRAINER_API_KEY`` or ``--api-key-file``, never from a flag.
Needs the ``trainer`` extra (tqdm, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from dpo_service.client import DpoClient, DpoClientError


class TrainerSettings(BaseSettings):
    """Secrets and defaults of the remote trainer (env prefix ``DPO_TRAINER_``)."""

    model_config = SettingsConfigDict(env_prefix="DPO_TRAINER_", extra="ignore")

    api_key: SecretStr | None = None


@dataclass
class StepRecord:
    step: int
    loss: float
    accuracy: float
    margin: float
    grad_norm: float | None
    model_version: int
    pairs_per_s: float


def load_pairs(path: Path) -> list[dict[str, str]]:
    """Preference triples from a JSONL file; each line needs prompt, chosen and rejected."""
    pairs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"prompt", "chosen", "rejected"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{lineno}: missing {sorted(missing)}")
            pairs.append({k: str(row[k]) for k in ("prompt", "chosen", "rejected")})
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


def batches(
    pairs: Sequence[dict[str, str]], size: int, seed: int
) -> Iterator[list[dict[str, str]]]:
    """Endless shuffled epochs of ``size``-pair batches."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield [pairs[i] for i in order[start : start + size]]


def connect(target: str, api_key: str | None, timeout: float) -> DpoClient:
    """``grpc://host:port`` or ``http(s)://host:port``."""
    if target.startswith("grpc://"):
        return DpoClient.grpc(target.removeprefix("grpc://"), api_key=api_key, timeout=timeout)
    if target.startswith(("http://", "https://")):
        return DpoClient.http(target, api_key=api_key, timeout=timeout)
    raise ValueError(f"--target must start with grpc://, http:// or https://, got {target!r}")


def train(
    client: DpoClient,
    pairs: Sequence[dict[str, str]],
    *,
    steps: int,
    batch_size: int,
    beta: float,
    seed: int = 0,
    progress: bool = True,
    run_id: str | None = None,
) -> list[StepRecord]:
    """Apply ``steps`` train steps; returns one record per step."""
    from tqdm import tqdm

    run_id = run_id or f"run-{int(time.time())}-{random.Random().randrange(1 << 30):x}"
    history: list[StepRecord] = []
    bar = tqdm(total=steps, disable=not progress, unit="step")
    for step, batch in zip(range(steps), batches(pairs, batch_size, seed), strict=False):
        started = time.monotonic()
        out = client.compute_loss(batch, beta=beta, train=True, request_id=f"{run_id}-{step}")
        rate = len(batch) / max(time.monotonic() - started, 1e-9)
        record = StepRecord(
            step=step,
            loss=out.loss,
            accuracy=out.accuracy,
            margin=sum(out.margins) / len(out.margins),
            grad_norm=out.grad_norm,
            model_version=out.new_model_version or out.model_version,
            pairs_per_s=rate,
        )
        history.append(record)
        bar.set_postfix(
            loss=f"{record.loss:.4f}", acc=f"{record.accuracy:.2f}",
            margin=f"{record.margin:.3f}", pairs_s=f"{rate:.1f}",
        )  # fmt: skip
        bar.update(1)
    bar.close()
    return history


def plot(history: Sequence[StepRecord], path: Path, window: int = 5) -> None:
    """Loss, mean reward margin and accuracy over steps (raw and a moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in history]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, name, values in zip(
        axes,
        ("loss", "reward margin", "accuracy"),
        ([r.loss for r in history], [r.margin for r in history], [r.accuracy for r in history]),
        strict=True,
    ):
        ax.plot(steps, values, alpha=0.35, label=name)
        ax.plot(steps, moving_average(values, window), label=f"{name} ({window}-step mean)")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="grpc://127.0.0.1:50051", help="grpc://… or http://…")
    parser.add_argument("--data", type=Path, required=True, help="preference JSONL")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per call (s)")
    parser.add_argument("--plot", type=Path, default=Path("out/remote_dpo.png"))
    parser.add_argument("--history", type=Path, help="JSON history (default: next to the plot)")
    parser.add_argument("--api-key-file", type=Path, help="file holding the service's API key")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the final checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    key = TrainerSettings().api_key
    api_key = key.get_secret_value() if key is not None else None
    if args.api_key_file is not None:
        api_key = args.api_key_file.read_text(encoding="utf-8").strip()
    pairs = load_pairs(args.data)
    with connect(args.target, api_key, args.timeout) as client:
        info = client.model_info()
        print(f"training {info.name} at version {info.model_version} on {len(pairs)} pairs")
        history = train(
            client, pairs, steps=args.steps, batch_size=min(args.batch_size, len(pairs)),
            beta=args.beta, seed=args.seed, progress=not args.no_progress,
        )  # fmt: skip
        if not args.no_checkpoint:
            try:
                ckpt = client.checkpoint()
                print(f"checkpoint written at version {ckpt.model_version}: {ckpt.path}")
            except DpoClientError as err:
                print(f"checkpoint not written: {err}")
    plot(history, args.plot)
    history_path = args.history or args.plot.with_suffix(".json")
    history_path.write_text(json.dumps([asdict(r) for r in history], indent=1), encoding="utf-8")
    first, last = history[: min(5, len(history))], history[-min(5, len(history)) :]
    print(
        f"loss {mean(r.loss for r in first):.4f} -> {mean(r.loss for r in last):.4f}; "
        f"plot: {args.plot}; history: {history_path}"
    )
    return 0


def mean(values: Any) -> float:
    items = list(values)
    return sum(items) / len(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-service train-remote", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
