"""Sessions benchmark (issue 12, "Measure"): LoRA session vs full-parameter training on one
base, memory per session, loss-only throughput with 1, 4 and 16 active sessions.

    .venv/bin/python bench/sessions.py            # make bench-sessions
    .venv/bin/python bench/sessions.py --smoke    # tiny model, proves the harness

The engine's real paths on the built-in model at the bench model's shape (d_model 512, 8
layers, 8 heads, MHA; byte vocabulary), float32 on CPU, token pairs of prompt 64 + responses
2 × 48. Each train mode runs in its own subprocess, so its peak RSS is its own:

- **full**: ``run_train_step`` on the default model (AdamW over every weight, frozen
  reference kept, ``reference: "frozen"``);
- **lora**: one session, rank 8 on the attention and MLP projections, ``reference: "base"``
  (the same frozen copy: ``DPO_KEEP_REFERENCE=true``).

Loss-only: 16 requests of 4 pairs spread over k sessions, run as one engine batch (one pass per
session), vs the same 16 requests on the default model (one pass). Best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import subprocess
import sys
import time
from typing import Any

from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.engine.preparation import PreparedRequest, prepare
from dpo_service.engine.sessions.lora import LoraSpec
from dpo_service.engine.sessions.session import OptimizerSpec, SessionConfig
from dpo_service.engine.sessions.training import session_train
from dpo_service.engine.train_step import run_train_step
from dpo_service.schemas import LossRequest
from dpo_service.settings import Settings

GIB = 1 << 30


def build(smoke: bool) -> Engine:
    shape = (
        dict(builtin_d_model=64, builtin_layers=2, builtin_heads=4, builtin_kv_heads=2)
        if smoke
        else dict(builtin_d_model=512, builtin_layers=8, builtin_heads=8, builtin_kv_heads=8)
    )
    settings = Settings(
        keep_reference=True, dtype="float32", device="cpu", api_key="bench-" + "k" * 40,
        lr=1e-6, max_sessions=32, **shape,
    )  # fmt: skip
    engine = make_engine(settings)
    engine.load()
    return engine


def request(
    engine: Engine, n: int, rng: random.Random, smoke: bool, **fields: Any
) -> PreparedRequest:
    lo, hi = (8, 6) if smoke else (64, 48)
    vocab = engine.require_bundle().vocab_size - 4
    pairs = [
        {"prompt_ids": [rng.randrange(vocab) for _ in range(lo)],
         "chosen_ids": [rng.randrange(vocab) for _ in range(hi)],
         "rejected_ids": [rng.randrange(vocab) for _ in range(hi)]}
        for _ in range(n)
    ]  # fmt: skip
    body = LossRequest.model_validate({"pairs": pairs, "reference": "frozen", **fields})
    limits = dataclasses.replace(engine.limits(), has_reference=True)
    return prepare(body, engine.require_bundle().tokenizer, limits)


def _config() -> SessionConfig:
    return SessionConfig(lora=LoraSpec(rank=8, alpha=16.0), optimizer=OptimizerSpec(lr=1e-4))


def train_mode(mode: str, smoke: bool, rounds: int) -> dict[str, Any]:
    """One train mode in this process: best step time, peak RSS, state bytes."""
    engine = build(smoke)
    rng = random.Random(0)
    state = engine.state
    assert state is not None and engine.sessions is not None
    session = engine.sessions.create(_config())[0] if mode == "lora" else None
    times = []
    for _ in range(rounds + 1):  # the first is the warm-up
        req = request(engine, 8, rng, smoke, train=True)
        started = time.perf_counter()
        if session is None:
            run_train_step(state, req, engine.settings)
        else:
            req = dataclasses.replace(req, session=session.id)
            session_train(session, req, engine.sessions.settings_of(session))
        times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in engine.require_bundle().model.parameters())
    out: dict[str, Any] = {
        "mode": mode, "step_s": min(times[1:]), "peak_rss_mib": _peak_rss_mib(),
        "params": params,
    }  # fmt: skip
    if session is not None:
        out["session_bytes"] = session.state_bytes()
        out["trainable"] = session.trainable_parameters()
        base = engine.sessions.require_base()
        out["base_bytes"] = sum(
            p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" not in n
        )
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loss_only(smoke: bool, rounds: int) -> list[dict[str, Any]]:
    """16 loss-only requests of 4 pairs over k sessions, one engine batch."""
    engine = build(smoke)
    assert engine.sessions is not None
    sessions = [engine.sessions.create(_config())[0] for _ in range(16)]
    rng = random.Random(1)
    requests = [request(engine, 4, rng, smoke) for _ in range(16)]
    rows = []
    for k in (0, 1, 4, 16):
        batch = [
            r if k == 0 else dataclasses.replace(r, session=sessions[i % k].id)
            for i, r in enumerate(requests)
        ]
        best = float("inf")
        for _ in range(rounds + 1):
            started = time.perf_counter()
            if k == 0:
                from dpo_service.engine.batcher import Job

                jobs = [Job(r, None, None) for r in batch]  # type: ignore[arg-type]
                engine._run_default(jobs)
            else:
                engine.sessions.run(batch)
            best = min(best, time.perf_counter() - started)
        rows.append({"sessions": k, "pairs_s": 64 / best})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_mode(args.child, args.smoke, args.rounds)))
        return 0
    modes = {}
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, "--child", mode, "--rounds", str(args.rounds)]
        out = subprocess.run(cmd + (["--smoke"] if args.smoke else []), check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        modes[mode] = json.loads(out.strip().splitlines()[-1])
    full, lora = modes["full"], modes["lora"]
    print(f"model: {full['params'] / 1e6:.1f}M parameters, 8 pairs per train step\n")
    # weights, gradients and AdamW state held for training (float32; the frozen copy counted
    # once: it is the reference of the default model and the sessions' base alike)
    params = full["params"]
    state = {"full": 4 * params * (1 + 1 + 2) + 4 * params,
             "lora": 4 * params + lora["base_bytes"] + lora["session_bytes"]}  # fmt: skip
    print("| train step | best s | × full | training state (MiB) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name, m in (("full", full), ("lora", lora)):
        label = "full-parameter (AdamW on all weights)" if m is full else "LoRA session (r=8)"
        print(f"| {label} | {m['step_s']:.3f} | {full['step_s'] / m['step_s']:.2f}× | "
              f"{state[name] / 2**20:,.0f} | {m['peak_rss_mib']:,.0f} |")  # fmt: skip
    per = lora["session_bytes"]
    fit = int((24 * GIB - lora["base_bytes"]) // per)
    print(f"\nper extra session: {lora['trainable']:,} adapter elements, {per / 2**20:.2f} MiB "
          f"(adapter + AdamW, float32) vs {lora['base_bytes'] / 2**20:.1f} MiB base; "
          f"{fit:,} sessions fit in 24 GiB beside the base (states only, no activations)\n")  # fmt: skip
    print("| loss-only, 16 requests × 4 pairs | pairs/s |\n|---|---:|")
    for row in loss_only(args.smoke, args.rounds):
        label = (
            "default model (one pass)" if row["sessions"] == 0 else f"{row['sessions']} session(s)"
        )
        print(f"| {label} | {row['pairs_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
