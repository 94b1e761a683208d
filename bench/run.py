"""DPO loss service benchmark: the textbook baseline (A) and the service, measured in one run.

    .venv/bin/python bench/run.py            # full run (make bench)
    .venv/bin/python bench/run.py --quick    # fewer workloads and rounds
    .venv/bin/python bench/run.py --smoke    # tiny model, proves the harness works

Prints one markdown table per workload (pairs/s, tokens/s, useful GFLOP/s, useful MFU, speed
and memory relative to baseline A), the serving table (HTTP, gRPC, dynamic batching) and the
targets with met / not met. Timings are the best of interleaved rounds after one warm-up
call each (the machine may be shared). Denormals are flushed to zero for every path (see
``main``). See ``workloads.py`` for the FLOP formula, ``memory.py``
for the peak-memory method, ``baseline.py`` for baseline A.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baseline
import memory
import paths
import serving
import torch
import workloads as W
from report import (
    A_LOSS,
    A_TRAIN,
    ENGINE_LOSS,
    ENGINE_TRAIN,
    PREV_LOSS,
    PREV_TRAIN,
    fmt,
    serving_table,
    targets,
)

from modern_llm.alignment.logprobs import LogpStrategy, PairTokens


@dataclass
class Row:
    name: str
    kind: str  # "loss" | "train"
    fn: Callable[[list[PairTokens]], object]
    memory_case: str | None = None
    times: list[float] = field(default_factory=list)
    mem: dict[str, Any] | None = None


@dataclass
class Section:
    workload: W.Workload
    params: int
    flops: float  # useful forward FLOPs of the batch
    tokens: int
    rows: list[Row]


def _rows(model: Any, harness: paths.Harness, wl: str, mode: str) -> list[Row]:
    """The paths measured on workload ``wl``: baseline A and the engine everywhere; one lever
    at a time on the TRL and long-prompt shapes (full mode); layouts on the others."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ablate = mode == "full" and wl in ("trl", "long_prompt")
    layouts = ablate or (mode != "smoke" and wl in ("trl", "short_prompt", "long_prompt"))
    loss: list[tuple[str, Callable[[list[PairTokens]], object], str | None]] = [
        (A_LOSS, lambda p: baseline.textbook_loss(model, p), "A loss"),
        (ENGINE_LOSS, harness.loss, "engine loss"),
    ]
    if mode != "smoke":
        loss.append((PREV_LOSS, paths.loss_with_padded_rows(harness), None))
    if ablate:
        loss.append(("lever 1 only: 1 pass (2B rows), full log-softmax",
                     lambda p: paths.one_pass_full_logits(model, p), None))  # fmt: skip
        loss.append(("+ lever 2: two_rows, LM head on responses, chunked",
                     lambda p: paths.library_loss(LogpStrategy.TWO_ROWS)(model, p), None))  # fmt: skip
    if layouts:
        for s in (LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE):
            loss.append((f"+ lever 3: {s.value} layout (one micro-batch)",
                         functools.partial(paths.library_loss(s), model), None))  # fmt: skip
    if wl == "mixed":
        loss.append(("engine loss-only, bucketing off (one micro-batch)",
                     paths.loss_without_bucketing(harness), None))  # fmt: skip
    train: list[tuple[str, Callable[[list[PairTokens]], object], str | None]] = [
        (A_TRAIN, lambda p: baseline.textbook_train_step(model, opt, p), "A train"),
        (ENGINE_TRAIN, harness.train, "engine train"),
    ]
    if mode != "smoke":
        prev = paths.train_step_with(harness, head="chunked", padded=True)
        train.append((PREV_TRAIN, prev, "engine train previous" if wl == "vocab128k" else None))
    if ablate and wl == "trl":  # each change of issue 15 on its own, on the shape
        train += [
            ("engine train, chunked head", paths.train_step_with(harness, head="chunked"), None),
            ("engine train, padded rows", paths.train_step_with(harness, padded=True), None),
        ]
    if ablate:
        train.append(
            ("engine train, two_rows layout", paths.train_step_with(harness, "two_rows"), None)
        )
    return [Row(n, "loss", f, m) for n, f, m in loss] + [Row(n, "train", f, m) for n, f, m in train]


def run_workload(wl: W.Workload, mode: str, rounds: int, with_memory: bool) -> Section:
    cfg = wl.config(W.SMOKE_MODEL if mode == "smoke" else W.BENCH_MODEL)
    model = W.build_model(cfg)
    pairs = wl.make_pairs(cfg.vocab_size)
    section = Section(
        wl,
        model.num_parameters(),
        W.useful_flops(cfg, W.layer_params(model), pairs),
        W.tokens(pairs),
        [],
    )
    harness = paths.Harness(model)
    section.rows = _rows(model, harness, wl.name, mode)
    print(f"  {wl.name}: {len(section.rows)} paths × {rounds} rounds", file=sys.stderr, flush=True)
    times = W.best_times({r.name: functools.partial(r.fn, pairs) for r in section.rows}, rounds)
    for r in section.rows:
        r.times = times[r.name]
    del harness, model
    smoke_cases = ("A loss", "engine loss")  # smoke: prove the subprocess path, stay short
    for r in section.rows:
        wanted = mode != "smoke" or r.memory_case in smoke_cases
        if with_memory and r.memory_case is not None and wanted:
            r.mem = memory.measure(r.memory_case, wl.name, smoke=mode == "smoke")
    return section


# ---------------------------------------------------------------------------------- report


def _mib(row: Row) -> str:
    return "–" if row.mem is None else fmt(row.mem["step_mib"], 0)


def section_table(sec: Section, peak: float) -> tuple[str, dict[str, dict[str, float]]]:
    wl = sec.workload
    lines = [
        f"### {wl.name}: {wl.title}",
        "",
        f"{wl.pairs} pairs per batch, {sec.tokens:,} distinct tokens, model "
        f"{sec.params / 1e6:.1f}M parameters; useful forward {sec.flops / 1e9:,.1f} GFLOP "
        "(train step 3×).",
        "",
        "| path | pairs/s | tokens/s | useful GFLOP/s | useful MFU | × A | step peak RSS (MiB) "
        "| ÷ A |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = {k: next(r for r in sec.rows if r.kind == k) for k in ("loss", "train")}
    stats: dict[str, dict[str, float]] = {}
    for r in sec.rows:
        best = min(r.times)
        flops = sec.flops * (3 if r.kind == "train" else 1)
        a = ref[r.kind]
        speed = min(a.times) / best
        mem_ratio = "–"
        if r.mem is not None and a.mem is not None and a.mem["step_mib"] > 0:
            mem_ratio = f"{r.mem['step_mib'] / a.mem['step_mib']:.2f}"
        gflops = flops / best / 1e9
        lines.append(
            f"| {r.name} | {fmt(wl.pairs / best, 2)} | {fmt(sec.tokens / best, 0)} | "
            f"{fmt(gflops)} | {100 * gflops / peak:.0f}% | {speed:.2f}× | {_mib(r)} | "
            f"{mem_ratio} |"
        )
        stats[r.name] = {
            "seconds": best,
            "speedup": speed,
            "mfu": gflops / peak,
            "step_mib": r.mem["step_mib"] if r.mem else float("nan"),
        }
    return "\n".join(lines), stats


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer workloads, ablations and rounds")
    ap.add_argument("--smoke", action="store_true", help="tiny model and batches (CI)")
    ap.add_argument(
        "--workloads", help="comma-separated subset of: " + ", ".join(W.WORKLOADS) + " (or none)"
    )
    ap.add_argument("--rounds", type=int, help="timed rounds per path (after one warm-up)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-serving", action="store_true", help="skip the HTTP/gRPC section")
    ap.add_argument("--markdown", type=Path, help="also write the report to this file")
    ap.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # Flush denormals to zero (before any torch thread starts, so the whole pool inherits it):
    # a saturated DPO sigmoid sends ~1e-37 gradients through backward, and denormal arithmetic
    # made one train step 60× slower here. Applies to every path alike.
    torch.set_flush_denormal(True)
    if args.memory_case:
        print(json.dumps(memory.measure_in_child(args.memory_case, args.workload, args.smoke)))
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    rounds = args.rounds or {"smoke": 1, "quick": 1, "full": 3}[mode]
    table = W.SMOKE_WORKLOADS if mode == "smoke" else W.WORKLOADS
    names = ["trl"] if mode == "smoke" else list(table)
    if mode == "quick":
        names = ["trl", "long_prompt", "vocab128k"]
    if args.workloads:
        names = [] if args.workloads == "none" else args.workloads.split(",")
    torch.manual_seed(0)
    info = W.machine()
    peak, where = W.matmul_peak(quick=mode != "full")
    out = ["## DPO loss service benchmark", "", "| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in info.items()]
    out += [f"| fp32 matmul peak (best {where}) | {peak:,.1f} GFLOP/s |", ""]
    out += [
        f"Command: `.venv/bin/python bench/run.py{' --' + mode if mode != 'full' else ''}`"
        f"; mode {mode}, best of {rounds} round(s) after a warm-up.",
        "",
    ]
    print("\n".join(out), flush=True)
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        sec = run_workload(table[name], mode, rounds, with_memory=not args.no_memory)
        text, stats[name] = section_table(sec, peak)
        print(text + "\n", flush=True)
        out += [text, ""]
    rate: dict[str, float] = {}
    small_rate: dict[str, float] = {}
    if not args.no_serving:
        shapes = [(W.SMOKE_MODEL, W.SMOKE_SERVE_WORKLOAD)]
        if mode != "smoke":
            shapes = [(W.BENCH_MODEL, W.SERVE_WORKLOAD), (W.SMALL_MODEL, W.SMALL_SERVE_WORKLOAD)]
        for cfg, wl in shapes:
            print(f"  serving: {wl.title}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                W.build_model(cfg).save_pretrained(Path(tmp) / "model")
                times = serving.run_serving(
                    Path(tmp) / "model",
                    wl.make_pairs(cfg.vocab_size),
                    max(rounds, 2),
                    batching_off=mode != "smoke",
                    latency_samples=(20 if mode == "smoke" else 200)
                    if wl is not W.SERVE_WORKLOAD
                    else 0,
                )
            text, shape_rate = serving_table(times, wl.pairs, wl.title)
            if wl is W.SMALL_SERVE_WORKLOAD:
                small_rate = shape_rate  # the small-request target is judged here
            rate = rate or shape_rate  # the others on the first (issue's) shape
            print(text + "\n", flush=True)
            out += [text, ""]
    text = targets(stats, rate, small_rate)
    print(text, flush=True)
    out.append(text)
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "peak_gflops": peak,
                    "workloads": stats,
                    "serving_pairs_per_s": rate,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
