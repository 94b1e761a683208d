"""Cost of the idempotency record as it grows: train steps with a ``request_id`` and a
checkpoint after every step (``DPO_CHECKPOINT_EVERY=1``), steps/s at the start vs later
(the median step time of a window of steps, so that a busy machine's noise does not count).

Issue 10 item 14: the record used to be re-serialised whole into every checkpoint, so a step
slowed as the record grew (3x over 225 steps). It is now appended to incrementally (one row
per step, :mod:`dpo_service.state.record`), so the two rates should agree.

Runs the engine in-process (its worker-thread code on this thread, no server), on a tiny
built-in model so the checkpoint, not the model, dominates::

    .venv/bin/python bench/idempotency.py            # 225 steps, window of 25
    .venv/bin/python bench/idempotency.py --steps 60 --window 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from dpo_service.engine.admission import make_engine  # noqa: E402
from dpo_service.engine.preparation import prepare  # noqa: E402
from dpo_service.engine.results import LossResult  # noqa: E402
from dpo_service.schemas import LossRequest  # noqa: E402
from dpo_service.settings import Settings  # noqa: E402

PAIRS = [
    {"prompt": f"Q{i}: 2+2?", "chosen": " 4", "rejected": " five"} for i in range(8)
]  # 8 pairs: each remembered result holds 8-long per-pair lists, as a real batch would
WARM_UP = 5  # first steps (allocator, optimizer state) are not timed


def run(steps: int, window: int, directory: Path) -> dict[str, Any]:
    settings = Settings(
        checkpoint_dir=directory,
        checkpoint_every=1,
        checkpoint_keep=2,
        builtin_d_model=32,
        builtin_layers=1,
        builtin_heads=2,
        builtin_kv_heads=1,
        builtin_max_seq_len=64,
        lr=1e-4,
        log_level="warning",
    )
    engine = make_engine(settings)
    engine.load()
    assert engine.bundle is not None
    times: list[float] = []
    try:
        for i in range(steps + WARM_UP):
            body = LossRequest.model_validate(
                {"pairs": PAIRS, "train": True, "request_id": f"bench-{i}"}
            )
            request = prepare(body, engine.bundle.tokenizer, engine.limits())
            started = time.perf_counter()
            result = engine._train_one(request)
            times.append(time.perf_counter() - started)
            if not isinstance(result, LossResult):
                raise SystemExit(f"step {i} failed: {result}")
    finally:
        asyncio.run(engine.stop())
    warm = times[WARM_UP:]
    first = 1.0 / statistics.median(warm[:window])
    last = 1.0 / statistics.median(warm[-window:])
    return {
        "steps": steps,
        "window": window,
        "first_steps_per_s": round(first, 1),
        "last_steps_per_s": round(last, 1),
        "slowdown": round(first / last, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=225)
    parser.add_argument("--window", type=int, default=25)
    args = parser.parse_args(argv)
    if args.window * 2 > args.steps:
        parser.error("--window must be at most half of --steps")
    with tempfile.TemporaryDirectory(prefix="dpo-bench-idem-") as tmp:
        out = run(args.steps, args.window, Path(tmp))
    print(
        f"steps/s (median) over the first {out['window']} steps: {out['first_steps_per_s']}; "
        f"over the "
        f"last {out['window']} of {out['steps']}: {out['last_steps_per_s']} "
        f"(slowdown x{out['slowdown']})"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
