"""The issue-15 defaults at the TRL shape, side by side: padding skipped vs padded rows, the
stored vs the chunked LM head; interleaved rounds (``workloads.best_times``), best and median.

    .venv/bin/python bench/defaults_check.py [ROUNDS]      # default 6
"""

from __future__ import annotations

import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paths
import workloads as W


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    wl = W.WORKLOADS["trl"]
    cfg = wl.config(W.BENCH_MODEL)
    pairs = wl.make_pairs(cfg.vocab_size)
    h = paths.Harness(W.build_model(cfg))
    fns = {
        "loss-only, padding skipped (default)": h.loss,
        "loss-only, padded rows (previous)": paths.loss_with_padded_rows(h),
        "train, padding skipped + stored head (default)": h.train,
        "train, padding skipped + chunked head": paths.train_step_with(h, head="chunked"),
        "train, padded rows + stored head": paths.train_step_with(h, head="stored", padded=True),
        "train, padded rows + chunked head (previous default)": paths.train_step_with(
            h, head="chunked", padded=True
        ),
    }
    times = W.best_times({k: functools.partial(f, pairs) for k, f in fns.items()}, rounds)
    print(f"| path, TRL shape ({rounds} rounds) | best pairs/s | median pairs/s |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {len(pairs) / min(t):.2f} | {len(pairs) / statistics.median(t):.2f} |")


if __name__ == "__main__":
    main()
