"""``bench/precision.py`` runs end to end in its smallest mode (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_precision_bench_smoke_prints_both_tables(tmp_path: Path) -> None:
    report = tmp_path / "precision.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "precision.py"), "--smoke", "--device", "cpu",
         "--markdown", str(report)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text("utf-8")
    issue = [line for line in text.splitlines() if line.startswith(("| float32 |", "| bfloat16 |",
             "| float16 |"))]  # fmt: skip
    assert len(issue) == 3
    for row in issue:  # every dtype: the step applied, nothing non-finite, the next one works
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == cells[4] == "trained: True" and cells[3] == "0.00%", row
    rows = [line for line in text.splitlines() if line.startswith("| engine ")]
    assert len(rows) == 4 and {r.split("|")[2].strip() for r in rows} == {"float32", "bfloat16"}
    assert all(r.split("|")[6].strip() not in ("", "–") for r in rows)  # step memory measured
