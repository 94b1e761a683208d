"""torch.profiler op table of one engine call at the TRL shape (8 pairs, the bench model).

.venv/bin/python bench/profile_ops.py loss|train [--shapes]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paths
import workloads as W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("which", choices=["loss", "train"])
    ap.add_argument("--shapes", action="store_true", help="group by input shapes")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as the service does (DPO_FLUSH_DENORMAL)
    h = paths.Harness(W.build_model(W.BENCH_MODEL))
    pairs = W.WORKLOADS["trl"].make_pairs(W.BENCH_MODEL.vocab_size)
    fn = (lambda: h.loss(pairs)) if args.which == "loss" else (lambda: h.train(pairs))
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        fn()
    table = prof.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40))


if __name__ == "__main__":
    main()
