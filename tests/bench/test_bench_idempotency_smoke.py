"""``bench/idempotency.py`` runs end to end in a short mode (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_idempotency_bench_prints_both_rates() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "idempotency.py"), "--steps", "12", "--window", "4"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["steps"] == 12 and out["window"] == 4
    assert out["first_steps_per_s"] > 0 and out["last_steps_per_s"] > 0
