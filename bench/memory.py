"""Peak memory of one step, each case in a fresh subprocess.

The child builds the model, warms the case up on a one-pair batch (library initialisation,
optimizer state), then reads its resident set size, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs the step once on the workload's batch and reads the peak
(``VmHWM``). ``step`` = peak − before: the memory the step itself needed. torch has no CPU
allocator statistics, and tracemalloc does not see its allocations, so RSS is the measure.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from modern_llm.alignment.logprobs import PairTokens

CASES = ("A loss", "engine loss", "A train", "engine train", "engine train previous")
_HERE = Path(__file__).resolve().parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_in_child(case: str, workload: str, smoke: bool) -> dict[str, Any]:
    """Runs inside the child: one step of ``case``; sizes in MiB."""
    import torch
    from baseline import textbook_loss, textbook_train_step
    from paths import Harness, train_step_with
    from workloads import BENCH_MODEL, SMOKE_MODEL, SMOKE_WORKLOADS, WORKLOADS, build_model

    wl = (SMOKE_WORKLOADS if smoke else WORKLOADS)[workload]
    cfg = wl.config(SMOKE_MODEL if smoke else BENCH_MODEL)
    model = build_model(cfg)
    pairs = wl.make_pairs(cfg.vocab_size)
    if case == "engine train previous":  # padded rows, chunked head
        step = train_step_with(Harness(model), head="chunked", padded=True)
    elif case.startswith("engine"):
        harness = Harness(model)
        step = harness.loss if case == "engine loss" else harness.train
    elif case == "A loss":
        step = lambda p: textbook_loss(model, p)  # noqa: E731
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        step = lambda p: textbook_train_step(model, opt, p)  # noqa: E731
    step([PairTokens([1, 2, 3], [4, 5], [6, 7])])  # warm-up
    gc.collect()
    before = _status_kib("VmRSS")
    exact = _reset_peak()
    step(pairs)
    peak = _status_kib("VmHWM")
    return {
        "case": case,
        "workload": workload,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "step_mib": (peak - before) / 1024,
        "peak_reset": exact,
    }


def measure(case: str, workload: str, smoke: bool, timeout: float = 900) -> dict[str, Any]:
    """Run ``case`` in a fresh interpreter (``bench/run.py --memory-case``)."""
    cmd = [sys.executable, str(_HERE / "run.py"), "--memory-case", case, "--workload", workload]
    if smoke:
        cmd.append("--smoke")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory case {case!r} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
