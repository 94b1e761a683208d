"""``bench/reference_cache.py`` runs end to end in its smallest mode (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reference_cache_bench_smoke_prints_every_row(tmp_path: Path) -> None:
    report = tmp_path / "reference.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reference_cache.py"), "--smoke", "--rounds", "1",
         "--batches", "1", "--pairs", "4", "--markdown", str(report)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = report.read_text("utf-8").splitlines()
    starts = ("| train, ", "| loss-only, ", "| cache I/O")
    runs = [line for line in lines if line.startswith(starts) and " ÷ " not in line]
    assert len(runs) == 8 and all(float(r.split("|")[2]) > 0 for r in runs)
    ratios = [line for line in lines if " ÷ " in line and not line.startswith("| ratio")]
    assert len(ratios) == 8 and all(float(r.split("|")[2]) > 0 for r in ratios)
