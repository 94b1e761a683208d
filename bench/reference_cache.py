"""Reference log-prob cache benchmark (issue 14, "Measure"): one run, side by side.

    .venv/bin/python bench/reference_cache.py             # make bench-reference
    .venv/bin/python bench/reference_cache.py --rounds 5 --pairs 16
    .venv/bin/python bench/reference_cache.py --smoke     # tiny model, proves the harness

The engine's real paths on the built-in model (d_model 256, 4 layers, GQA 8/2, byte
tokenizer: the service's default built-in model), frozen reference kept, float32, TRL-shaped
token pairs (prompt 130-170, responses 120-160 tokens), ``--batches`` train requests of
``--pairs`` pairs per epoch. Every round, with a fresh empty cache file:

1. **train, cache off**: the epoch with ``reference: "frozen"``, no cache (today's cost);
2. **train, epoch 1 (cold)**: the epoch with the cache: every sequence misses, is computed
   and written (the miss-only run of a train step);
3. **train, epoch 2 (warm)**: the same epoch again: every sequence hits, no reference pass;
4. **train, no reference**: the epoch with ``reference: "none"`` (the step without any
   reference pass: the floor epoch 2 should reach);
5. **loss-only, cache off / miss-only / all hits**: the loss-only path
   (``forward_logps`` of the policy + ``reference_logps``) on the same batches; miss-only
   uses yet another empty cache, so it pays the lookups and the writes and saves nothing.

Rows are the best epoch over the rounds, with the spread (max / min − 1) across rounds; the
ratios divide best times measured in the same run. Other processes share these 2 cores:
read the spread before the ratio.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import workloads as W

from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.engine.forward import forward_logps
from dpo_service.engine.preparation import PreparedRequest, prepare
from dpo_service.engine.reference_lookup import bind, reference_logps
from dpo_service.schemas import LossRequest
from dpo_service.settings import Settings
from dpo_service.state.reference_cache import ReferenceCache


def token_pairs(n: int, vocab: int, smoke: bool, rng: random.Random) -> list[dict[str, Any]]:
    """TRL-shaped pairs of random token ids (ids 0..vocab-1 minus the top few specials)."""
    lo, hi = ((8, 16), (6, 12)) if smoke else ((130, 170), (120, 160))

    def ids(a: int, b: int) -> list[int]:
        return [rng.randrange(0, vocab - 4) for _ in range(rng.randint(a, b))]

    return [
        {"prompt_ids": ids(*lo), "chosen_ids": ids(*hi), "rejected_ids": ids(*hi)} for _ in range(n)
    ]


def build(smoke: bool, cache: Path) -> Engine:
    model = (
        dict(builtin_d_model=64, builtin_layers=2, builtin_heads=4, builtin_kv_heads=2)
        if smoke
        else {}
    )
    settings = Settings(
        keep_reference=True, reference_cache=str(cache), dtype="float32", device="cpu",
        api_key="bench-" + "k" * 40, lr=1e-6, **model,
    )  # fmt: skip
    engine = make_engine(settings)
    engine.load()
    return engine


def prepared(
    engine: Engine, batches: list[list[dict[str, Any]]], **kw: Any
) -> list[PreparedRequest]:
    bundle, limits = engine.require_bundle(), engine.limits()
    return [
        prepare(LossRequest(pairs=b, **kw), bundle.tokenizer, limits)  # type: ignore[arg-type]
        for b in batches
    ]


def fresh_cache(engine: Engine, where: Path, name: str) -> None:
    """Point the engine's lookup at a new, empty cache file."""
    lookup = engine.reference_lookup
    assert lookup is not None and engine.state is not None and engine.state.reference is not None
    lookup.cache.close()
    lookup.cache = ReferenceCache(where / f"{name}.sqlite", max_entries=10**7)
    bind(engine.state.reference, lookup)


def cache_off(engine: Engine) -> None:
    lookup = engine.reference_lookup
    assert lookup is not None
    lookup.cache.close()  # reference_logps: a closed cache is plain forward_logps


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_epoch(engine: Engine, requests: list[PreparedRequest]) -> None:
    for r in requests:
        out = engine._train_one(r)
        assert not isinstance(out, BaseException), out


def loss_epoch(engine: Engine, requests: list[PreparedRequest]) -> None:
    state = engine.state
    assert state is not None and state.reference is not None
    with torch.inference_mode():
        for r in requests:
            forward_logps(state.bundle.causal_lm, r.pairs, engine.settings, state.bundle)
            reference_logps(state.reference, r.pairs, engine.settings, state.bundle)


def one_round(
    engine: Engine, reqs: dict[str, list[PreparedRequest]], where: Path, r: int
) -> dict[str, float]:
    """One round; the order of the runs rotates from round to round (a cold epoch always
    right before its warm one), so drift and neighbours' load spread over all of them."""
    t: dict[str, float] = {}

    def train_off() -> None:
        cache_off(engine)
        t["train, cache off"] = timed(lambda: train_epoch(engine, reqs["frozen"]))

    def train_cached() -> None:
        fresh_cache(engine, where, f"train-{r}")
        t[COLD] = timed(lambda: train_epoch(engine, reqs["frozen"]))
        t[WARM] = timed(lambda: train_epoch(engine, reqs["frozen"]))

    def train_none() -> None:
        t[NONE] = timed(lambda: train_epoch(engine, reqs["none"]))

    def loss_off() -> None:
        cache_off(engine)
        t["loss-only, cache off"] = timed(lambda: loss_epoch(engine, reqs["frozen"]))

    def loss_cached() -> None:
        fresh_cache(engine, where, f"loss-{r}")
        t["loss-only, miss-only (empty cache)"] = timed(lambda: loss_epoch(engine, reqs["frozen"]))
        t["loss-only, all hits"] = timed(lambda: loss_epoch(engine, reqs["frozen"]))

    def cache_io() -> None:  # the miss path's own cost, without any model work
        fresh_cache(engine, where, f"io-{r}")
        lookup = engine.reference_lookup
        assert lookup is not None

        def run() -> None:
            for req in reqs["frozen"]:
                keys = lookup.keys(req.pairs)
                lookup.cache.get_many(keys)
                lookup.cache.put_many([(k, -1.0, 1) for k in keys])

        t[IO] = timed(run)

    runs = [train_off, train_cached, train_none, loss_off, loss_cached, cache_io]
    k = r % len(runs)
    for run in runs[k:] + runs[:k]:
        run()
    order = ["train, cache off", COLD, WARM, NONE, "loss-only, cache off"]
    order += ["loss-only, miss-only (empty cache)", "loss-only, all hits", IO]
    return {name: t[name] for name in order}


COLD = "train, epoch 1 (cold cache: all misses)"
WARM = "train, epoch 2 (warm cache: all hits)"
NONE = "train, no reference pass (reference none)"
IO = "cache I/O alone, miss-only (keys, lookups, writes)"


RATIOS = (
    ("train epoch 2 ÷ epoch 1", "train, epoch 2 (warm cache: all hits)", "train, epoch 1 (cold cache: all misses)"),
    ("train epoch 2 ÷ cache off", "train, epoch 2 (warm cache: all hits)", "train, cache off"),
    ("train epoch 2 ÷ no reference", "train, epoch 2 (warm cache: all hits)", "train, no reference pass (reference none)"),
    ("train epoch 1 (miss-only) ÷ cache off", "train, epoch 1 (cold cache: all misses)", "train, cache off"),
    ("loss-only miss-only ÷ cache off", "loss-only, miss-only (empty cache)", "loss-only, cache off"),
    ("loss-only all hits ÷ cache off", "loss-only, all hits", "loss-only, cache off"),
    ("cache I/O alone ÷ train, cache off", IO, "train, cache off"),
    ("cache I/O alone ÷ loss-only, cache off", IO, "loss-only, cache off"),
)  # fmt: skip


def report(
    rounds: list[dict[str, float]], pairs: int, batches: int, params: int, cmd: str, smoke: bool
) -> str:
    shape = "tiny (smoke)" if smoke else "TRL-shaped (prompt 130-170, responses 120-160)"
    info = W.machine()
    out = ["## Reference log-prob cache benchmark", "", "| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in info.items()] + [""]
    out += [
        f"Command: `{cmd}`; {len(rounds)} rounds after a warm-up, each with fresh cache files.",
        "",
    ]
    out += [
        f"Built-in model {params / 1e6:.1f}M parameters, float32, CPU; an epoch is {batches} "
        f"train requests of {pairs} {shape} token pairs, frozen reference.",
        "",
        "| run | best epoch (s) | median (s) | spread (max/min − 1) |",
        "|---|---:|---:|---:|",
    ]
    best: dict[str, float] = {}
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        best[name], median = W.summary(values)
        out.append(
            f"| {name} | {best[name]:.4f} | {median:.4f} | {max(values) / min(values) - 1:.1%} |"
        )
    out += ["", "| ratio (same run) | best ÷ best | median of rounds | per-round range |"]
    out += ["|---|---:|---:|---:|"]
    for label, a, b in RATIOS:
        per = [r[a] / r[b] for r in rounds]
        out.append(
            f"| {label} | {best[a] / best[b]:.3f} | {W.summary(per)[1]:.3f} | "
            f"{min(per):.3f}–{max(per):.3f} |"
        )
    share = 1 - best["train, no reference pass (reference none)"] / best["train, cache off"]
    out += ["", f"Reference pass share of a cache-off train step: {share:.1%}."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per train request")
    ap.add_argument("--batches", type=int, default=3, help="train requests per epoch")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up")
    ap.add_argument("--smoke", action="store_true", help="tiny model and pairs (CI)")
    ap.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)  # as the service (DPO_FLUSH_DENORMAL)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="refcache-bench-") as tmp:
        where = Path(tmp)
        engine = build(args.smoke, where / "warmup.sqlite")
        vocab = engine.require_bundle().vocab_size
        batches = [token_pairs(args.pairs, vocab, args.smoke, rng) for _ in range(args.batches)]
        reqs = {
            "frozen": prepared(engine, batches, train=True, reference="frozen"),
            "none": prepared(engine, batches, train=True, reference="none"),
        }
        one_round(engine, reqs, where, -1)  # warm-up
        rounds = [one_round(engine, reqs, where, r) for r in range(args.rounds)]
        params = sum(p.numel() for p in engine.require_bundle().model.parameters())
        cache_off(engine)
    flags = " ".join(
        f"--{k} {getattr(args, k)}" for k in ("pairs", "batches", "rounds")
        if getattr(args, k) != ap.get_default(k)
    )  # fmt: skip
    cmd = f".venv/bin/python bench/reference_cache.py{' --smoke' if args.smoke else ''}"
    cmd += f" {flags}" if flags else ""
    text = report(rounds, args.pairs, args.batches, params, cmd, args.smoke)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
