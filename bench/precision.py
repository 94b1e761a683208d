"""Precision benchmark: float32 vs bfloat16 autocast (and float16 on request), same run.

    .venv/bin/python bench/precision.py                      # make bench-precision (CPU)
    DPO_DEVICE=cuda .venv/bin/python bench/precision.py      # on a GPU (bench/gpu_check.sh)
    .venv/bin/python bench/precision.py --dtypes float32,bfloat16,float16 --rounds 5
    .venv/bin/python bench/precision.py --smoke              # tiny model, proves the harness

Two tables:

1. **One step at the default learning rate** (the precision issue's table): the service's
   default built-in model, the engine's real train path, one step per ``DPO_DTYPE``; the share
   of parameter elements the step changed, the share that are not finite, and whether the next
   train request still works.
2. **Throughput and step memory** per compute dtype on the engine's own paths (``engine
   loss-only``: ``forward_logps`` under ``inference_mode``; ``engine train step``:
   ``run_train_step``), on ``workloads.SMALL_MODEL`` (d 256, 4 layers, GQA 8/2, vocab 32k,
   tied embeddings: 11.0M parameters; the 58.5M bench model would not fit 3 minutes on 2
   cores; the whole run takes ~45 s on this project's machine) with the TRL shape (8 pairs,
   prompt 130-170, responses 120-160). Best of interleaved rounds after a warm-up. Step
   memory: on CPU the peak RSS of a fresh subprocess running only that step minus its RSS
   before (``memory.py``'s method: warm-up on one pair first, so AdamW's state is already
   there); on CUDA ``torch.cuda.max_memory_allocated`` over the step minus the allocation
   before it. "held" is what ``/v1/model`` reports as held between steps once AdamW has
   stepped (weights + optimizer state).

The device comes from ``DPO_DEVICE`` through :class:`~dpo_service.settings.Settings` (or
``--device``). A CPU without native bf16 instructions runs bf16 slower than fp32: that is a
measurement, not a failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory
import paths
import torch
import workloads as W

from dpo_service.engine.admission import make_engine
from dpo_service.engine.precision import memory_report
from dpo_service.engine.preparation import prepare
from dpo_service.models.loader import resolve_device
from dpo_service.schemas import LossRequest
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens

_HERE = Path(__file__).resolve().parent
TRL8 = W.WORKLOADS["trl"]
SMOKE = W.SMOKE_WORKLOADS["trl"]
ISSUE_PAIR = {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"}


# ------------------------------------------------------------------- 1: the issue's table
def one_step_row(dtype: str, device: str) -> dict[str, Any]:
    """One train step at the default learning rate on the default built-in model."""
    engine = make_engine(Settings(dtype=dtype, device=device, api_key="x" * 40))
    engine.load()
    assert engine.bundle is not None and engine.state is not None
    params = list(engine.bundle.model.parameters())
    before = [p.detach().clone() for p in params]

    def step(rid: str) -> str:
        body = LossRequest.model_validate({"pairs": [ISSUE_PAIR], "train": True, "request_id": rid})
        bundle = engine.require_bundle()
        out = engine._train_one(prepare(body, bundle.tokenizer, engine.limits()))
        return f"error: {out}" if isinstance(out, BaseException) else f"trained: {out.trained}"

    first = step("issue-1")
    total = sum(p.numel() for p in params)
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before, strict=True))
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in params)
    return {
        "dtype": dtype,
        "first": first,
        "changed": changed / total,
        "non_finite": bad / total,
        "next": step("issue-2"),
    }


def issue_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "### one train step at the default learning rate (built-in model, the issue's table)",
        "",
        "| DPO_DTYPE | step | parameter elements changed | not finite | next train request |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['first']} | {100 * r['changed']:.2f}% | "
            f"{100 * r['non_finite']:.2f}% | {r['next']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------- 2: throughput and memory
def _harness(
    dtype: str, device: torch.device, smoke: bool
) -> tuple[paths.Harness, list[PairTokens]]:
    cfg = W.SMOKE_MODEL if smoke else W.SMALL_MODEL
    wl = SMOKE if smoke else TRL8
    model = W.build_model(cfg).to(device)
    return paths.Harness(model, dtype=dtype, device=str(device)), wl.make_pairs(cfg.vocab_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_memory_mib(dtype: str, kind: str, device: torch.device, smoke: bool) -> float:
    """Memory one ``kind`` step needs (see the module docstring for the method)."""
    if device.type == "cuda":
        harness, pairs = _harness(dtype, device, smoke)
        fn = harness.loss if kind == "loss" else harness.train
        fn([PairTokens([1, 2, 3], [4, 5], [6, 7])])
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(pairs)
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case", f"{dtype}:{kind}"]
    done = subprocess.run(cmd + (["--smoke"] if smoke else []), capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"memory case {dtype}:{kind} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["step_mib"])


def memory_child(case: str, smoke: bool) -> dict[str, float]:
    """Runs in the subprocess: peak RSS of one CPU step."""
    dtype, kind = case.split(":")
    harness, pairs = _harness(dtype, torch.device("cpu"), smoke)
    fn = harness.loss if kind == "loss" else harness.train
    fn([PairTokens([1, 2, 3], [4, 5], [6, 7])])  # warm-up: libraries, AdamW state
    gc.collect()
    before = memory._status_kib("VmRSS")
    memory._reset_peak()
    fn(pairs)
    return {"step_mib": (memory._status_kib("VmHWM") - before) / 1024}


def measure(dtypes: list[str], device: torch.device, rounds: int, smoke: bool) -> dict[str, Any]:
    """Seconds per step (best of ``rounds``), step memory and held memory per dtype."""
    harnesses = {dt: _harness(dt, device, smoke) for dt in dtypes}
    fns = {}
    for dt, (h, pairs) in harnesses.items():
        for kind, fn in (("loss", h.loss), ("train", h.train)):
            fns[(dt, kind)] = lambda fn=fn, pairs=pairs: (fn(pairs), _sync(device))
    times = W.best_times({f"{dt}|{k}": f for (dt, k), f in fns.items()}, rounds)
    held = {}
    for dt, (h, _) in harnesses.items():
        rep = memory_report(h.state.bundle.model, h.state.optimizer, None, snapshot=False)
        held[dt] = (sum(rep.weights_bytes.values()) + rep.optimizer_state_bytes_after_step) / 2**20
    pairs = harnesses[dtypes[0]][1]
    del harnesses, fns
    gc.collect()
    out: dict[str, Any] = {"pairs": len(pairs), "tokens": W.tokens(pairs), "rows": []}
    for dt in dtypes:
        for kind in ("loss", "train"):
            out["rows"].append({
                "dtype": dt, "kind": kind, "seconds": min(times[f"{dt}|{kind}"]),
                "step_mib": step_memory_mib(dt, kind, device, smoke), "held_mib": held[dt],
            })  # fmt: skip
    return out


def throughput_table(result: dict[str, Any], device: torch.device, smoke: bool) -> str:
    cfg = W.SMOKE_MODEL if smoke else W.SMALL_MODEL
    params = W.build_model(cfg).num_parameters()
    lines = [
        f"### throughput and step memory by compute dtype ({device})",
        "",
        f"{result['pairs']} pairs per batch ({result['tokens']:,} distinct tokens), model "
        f"{params / 1e6:.1f}M parameters (d {cfg.d_model}, {cfg.n_layers} layers, vocab "
        f"{cfg.vocab_size:,}); parameters and AdamW state are float32 in every row.",
        "",
        "| path | compute dtype | pairs/s | tokens/s | × float32 | step peak (MiB) | "
        "÷ float32 | held (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["kind"]: r for r in result["rows"] if r["dtype"] == "float32"}
    for r in result["rows"]:
        b = base.get(r["kind"])
        speed = f"{b['seconds'] / r['seconds']:.2f}×" if b else "–"
        mem = f"{r['step_mib'] / b['step_mib']:.2f}" if b and b["step_mib"] > 0 else "–"
        name = "engine loss-only" if r["kind"] == "loss" else "engine train step"
        lines.append(
            f"| {name} | {r['dtype']} | {result['pairs'] / r['seconds']:.2f} | "
            f"{result['tokens'] / r['seconds']:,.0f} | {speed} | {r['step_mib']:,.0f} | {mem} | "
            f"{r['held_mib']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, float32 first")
    ap.add_argument("--device", help="cpu, cuda, cuda:N (default: DPO_DEVICE, else auto)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up")
    ap.add_argument("--smoke", action="store_true", help="tiny model and batch (CI)")
    ap.add_argument("--markdown", type=Path, help="also write the report to this file")
    ap.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)  # as bench/run.py and the service (DPO_FLUSH_DENORMAL)
    if args.memory_case:
        print(json.dumps(memory_child(args.memory_case, args.smoke)))
        return 0
    device = resolve_device(args.device or Settings().device)
    dtypes = args.dtypes.split(",")
    info = W.machine()
    out = ["## Precision benchmark", "", "| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in info.items()] + [""]
    flags = " ".join(f"--{k} {v}" for k, v in (("dtypes", args.dtypes), ("rounds", args.rounds))
                     if v != ap.get_default(k))  # fmt: skip
    out += [f"Command: `DPO_DEVICE={device.type} .venv/bin/python bench/precision.py"
            f"{' --smoke' if args.smoke else ''}{' ' + flags if flags else ''}`", ""]  # fmt: skip
    print("\n".join(out), flush=True)
    text = issue_table([one_step_row(dt, str(device)) for dt in ("float32", "bfloat16", "float16")])
    print(text + "\n", flush=True)
    result = measure(dtypes, device, args.rounds, args.smoke)
    table = throughput_table(result, device, args.smoke)
    print(table, flush=True)
    out += [text, "", table]
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
