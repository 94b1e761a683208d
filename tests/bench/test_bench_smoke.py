"""The benchmark runs end to end in its smallest mode (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_smoke_runs_every_section(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--markdown", str(report)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text("utf-8")
    for needle in (
        "fp32 matmul peak",
        "A: textbook, 2 passes, full log-softmax",
        "engine loss-only",
        "engine train step",
        "HTTP, one request",
        "gRPC, one request",
        "HTTP, concurrent 1-pair clients, batching on",
        "gRPC, concurrent 1-pair clients, batching on",
        "One 1-pair request at a time",
        "### targets",
    ):
        assert needle in text, needle
    # the peak-memory subprocess ran and reported a number, not a dash
    row = next(line for line in text.splitlines() if line.startswith("| engine loss-only"))
    assert row.split("|")[7].strip() != "–"
    # latency rows: every sample counted, p99 at or above p50
    for proto in ("in-process core", "HTTP", "gRPC"):
        cells = next(line for line in text.splitlines() if line.startswith(f"| {proto} |"))
        _, _, n, p50, p99, _, _ = cells.split("|")
        assert int(n) == 20 and float(p99) >= float(p50) > 0, cells
