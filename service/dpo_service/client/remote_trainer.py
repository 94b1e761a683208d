"""The remote trainer's side: stream a preference dataset to a running service and train it.

    dpo-service train-remote --target grpc://127.0.0.1:50051 --data examples/data/preferences.jsonl \\
        --steps 40 --batch-size 8 --plot out/remote_dpo.png [--eval-data held_out.parquet]

Reads a JSONL or Parquet dataset in TRL's standard, conversational or implicit-prompt form
(:mod:`dpo_service.client.preference_data`), sends batches as train requests over gRPC or
HTTP with the package's client (jittered backoff on 429/503/RESOURCE_EXHAUSTED/UNAVAILABLE,
deadlines, and a ``request_id`` per step so a retry never applies a step twice), shows a
progress bar (loss, accuracy, margin, pairs/s, held-out loss), asks the service for a
checkpoint at the end, and writes a PNG plot of loss, reward margin and accuracy over steps
plus the history as JSON (``{"train": [...], "eval": [...]}``). With ``--eval-data`` a
held-out set is evaluated with loss-only requests before the first step, every
``--eval-every`` steps and after the last, and drawn on the same axes.

The API key comes from ``DPO_TRAINER_API_KEY`` or ``--api-key-file``, never from a flag.
Needs the ``trainer`` extra (tqdm, matplotlib, pyarrow).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from dpo_service.client import DpoClient, DpoClientError
from dpo_service.client.preference_data import load_examples
from dpo_service.client.trainer_plot import plot
from dpo_service.client.trainer_sessions import (
    add_session_arguments,
    finish_session,
    open_session,
)


class TrainerSettings(BaseSettings):
    """Secrets and defaults of the remote trainer (env prefix ``DPO_TRAINER_``)."""

    model_config = SettingsConfigDict(env_prefix="DPO_TRAINER_", extra="ignore")

    api_key: SecretStr | None = None


@dataclass
class StepRecord:
    """One train step: the loss and statistics the service computed before applying it."""

    step: int
    loss: float
    accuracy: float
    margin: float
    grad_norm: float | None
    model_version: int
    pairs_per_s: float


@dataclass
class EvalRecord:
    """The held-out set after ``step`` train steps, means over all its pairs. Plotted at
    x = step, next to train record ``step``, whose loss was computed at the same version
    (a train record's ``model_version`` is the one its step produced)."""

    step: int
    model_version: int
    loss: float
    accuracy: float
    margin: float
    pairs: int


@dataclass
class History:
    """What a run did: one record per train step, one per evaluation of the held-out set."""

    train: list[StepRecord] = field(default_factory=list)
    eval: list[EvalRecord] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {"train": [asdict(r) for r in self.train], "eval": [asdict(r) for r in self.eval]},
            indent=1,
        )


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """The request pairs of a preference dataset (JSONL or Parquet; standard, conversational
    or implicit-prompt form: see :mod:`dpo_service.client.preference_data`)."""
    return [example.to_pair() for example in load_examples(path)]


def batches(
    pairs: Sequence[dict[str, Any]], size: int, seed: int
) -> Iterator[list[dict[str, Any]]]:
    """Endless shuffled epochs of ``size``-pair batches."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield [pairs[i] for i in order[start : start + size]]


def loss_options(loss_type: str, loss_weights: str | None = None) -> dict[str, Any]:
    """``--loss-type sigmoid,sft --loss-weights 1,0.5`` as request fields (a composed loss; one
    name without weights stays a single ``loss_type``). ``ValueError`` for a bad weight."""
    names = [n.strip() for n in loss_type.split(",") if n.strip()]
    if len(names) == 1 and loss_weights is None:
        return {"loss_type": names[0]}
    out: dict[str, Any] = {"loss_type": names}
    if loss_weights is not None:
        out["loss_weights"] = [float(w) for w in loss_weights.split(",")]
    return out


def evaluate(
    client: DpoClient, pairs: Sequence[dict[str, Any]], *, step: int, batch_size: int, beta: float,
    loss_fields: dict[str, Any] | None = None,
) -> EvalRecord:  # fmt: skip
    """Loss-only requests over ``pairs`` in order, ``batch_size`` at a time (the model does not
    move); loss, accuracy and margin are means over all pairs."""
    loss = accuracy = margin = 0.0
    version = -1
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out = client.compute_loss(chunk, beta=beta, train=False, **(loss_fields or {}))
        loss += out.loss * len(chunk)
        accuracy += out.accuracy * len(chunk)
        margin += sum(out.margins)
        version = out.model_version
    n = len(pairs)
    return EvalRecord(step, version, loss / n, accuracy / n, margin / n, n)


def connect(target: str, api_key: str | None, timeout: float) -> DpoClient:
    """``grpc://host:port`` or ``http(s)://host:port``."""
    if target.startswith("grpc://"):
        return DpoClient.grpc(target.removeprefix("grpc://"), api_key=api_key, timeout=timeout)
    if target.startswith(("http://", "https://")):
        return DpoClient.http(target, api_key=api_key, timeout=timeout)
    raise ValueError(f"--target must start with grpc://, http:// or https://, got {target!r}")


@dataclass(frozen=True)
class EvalPlan:
    """A held-out set, evaluated before the first step, every ``every`` steps and after the
    last one, in loss-only requests of ``batch_size`` pairs."""

    pairs: Sequence[dict[str, Any]]
    every: int
    batch_size: int


def train(
    client: DpoClient,
    pairs: Sequence[dict[str, Any]],
    *,
    steps: int,
    batch_size: int,
    beta: float,
    seed: int = 0,
    progress: bool = True,
    run_id: str | None = None,
    eval_plan: EvalPlan | None = None,
    loss_fields: dict[str, Any] | None = None,
) -> History:
    """Apply ``steps`` train steps (one record each), evaluating ``eval_plan``'s held-out set
    after 0, N, 2N, ... and ``steps`` steps."""
    from tqdm import tqdm

    run_id = run_id or f"run-{int(time.time())}-{random.Random().randrange(1 << 30):x}"
    history = History()
    bar = tqdm(total=steps, disable=not progress, unit="step")

    def maybe_evaluate(done: int) -> None:
        if eval_plan is not None and (done % eval_plan.every == 0 or done == steps):
            history.eval.append(
                evaluate(client, eval_plan.pairs, step=done, batch_size=eval_plan.batch_size,
                         beta=beta, loss_fields=loss_fields)
            )  # fmt: skip

    maybe_evaluate(0)
    for step, batch in zip(range(steps), batches(pairs, batch_size, seed), strict=False):
        started = time.monotonic()
        out = client.compute_loss(
            batch, beta=beta, train=True, request_id=f"{run_id}-{step}", **(loss_fields or {})
        )
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
        history.train.append(record)
        maybe_evaluate(step + 1)
        postfix = {"loss": f"{record.loss:.4f}", "acc": f"{record.accuracy:.2f}",
                   "margin": f"{record.margin:.3f}", "pairs_s": f"{rate:.1f}"}  # fmt: skip
        if history.eval:
            postfix["eval_loss"] = f"{history.eval[-1].loss:.4f}"
        bar.set_postfix(postfix)
        bar.update(1)
    bar.close()
    return history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="grpc://127.0.0.1:50051", help="grpc://… or http://…")
    parser.add_argument(
        "--data", type=Path, required=True,
        help="preference dataset, .jsonl or .parquet (standard, conversational or implicit prompt)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--loss-type", default="sigmoid", help="a loss, or terms for a composed one: sigmoid,sft"
    )
    parser.add_argument("--loss-weights", help="one weight per --loss-type term: 1,0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-data", type=Path, help="held-out dataset (same formats as --data)")
    parser.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps")
    parser.add_argument(
        "--eval-batch-size", type=int, help="pairs per loss-only eval request (default: --batch-size)"
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per call (s)")
    parser.add_argument("--plot", type=Path, default=Path("out/remote_dpo.png"))
    parser.add_argument("--history", type=Path, help="JSON history (default: next to the plot)")
    parser.add_argument("--api-key-file", type=Path, help="file holding the service's API key")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the final checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_session_arguments(parser)  # issue 12: --session, --lora-*, --export


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "eval_every", "eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _load(args: argparse.Namespace) -> tuple[list[dict[str, Any]], EvalPlan | None]:
    _check_counts(args)
    pairs = load_pairs(args.data)
    if args.eval_data is None:
        return pairs, None
    eval_pairs = load_pairs(args.eval_data)
    size = args.eval_batch_size or args.batch_size
    return pairs, EvalPlan(eval_pairs, args.eval_every, size)


def run(args: argparse.Namespace) -> int:
    key = TrainerSettings().api_key
    api_key = key.get_secret_value() if key is not None else None
    if args.api_key_file is not None:
        api_key = args.api_key_file.read_text(encoding="utf-8").strip()
    try:
        pairs, eval_plan = _load(args)
        loss_fields = loss_options(args.loss_type, args.loss_weights)
        session = open_session(args, api_key)  # issue 12: None without --session
    except (ValueError, OSError, DpoClientError) as err:  # DatasetError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    if session is not None:  # train the session's adapter with the session's key
        api_key, loss_fields["session"] = session.key, session.id
    with connect(args.target, api_key, args.timeout) as client:
        info = client.model_info()
        held_out = f" (+{len(eval_plan.pairs)} held out)" if eval_plan else ""
        print(
            f"training {info.name} at version {info.model_version} on {len(pairs)} pairs{held_out}"
        )
        try:
            history = train(
                client, pairs, steps=args.steps, batch_size=min(args.batch_size, len(pairs)),
                beta=args.beta, seed=args.seed, progress=not args.no_progress, eval_plan=eval_plan,
                loss_fields=loss_fields,
            )  # fmt: skip
        except DpoClientError as err:
            print(f"error: the service refused a request: {err}", file=sys.stderr)
            return 1
        if session is not None:
            try:
                finish_session(args, session)
            except (ValueError, OSError, DpoClientError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        elif not args.no_checkpoint:
            try:
                ckpt = client.checkpoint()
                print(f"checkpoint written at version {ckpt.model_version}: {ckpt.path}")
            except DpoClientError as err:
                print(f"checkpoint not written: {err}")
    plot(history.train, args.plot, evals=history.eval)
    history_path = args.history or args.plot.with_suffix(".json")
    history_path.write_text(history.to_json(), encoding="utf-8")
    steps = history.train
    first, last = steps[: min(5, len(steps))], steps[-min(5, len(steps)) :]
    summary = f"loss {mean(r.loss for r in first):.4f} -> {mean(r.loss for r in last):.4f}"
    if history.eval:
        summary += f"; held-out loss {history.eval[0].loss:.4f} -> {history.eval[-1].loss:.4f}"
    print(f"{summary}; plot: {args.plot}; history: {history_path}")
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
