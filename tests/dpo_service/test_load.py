"""A bounded load run: 32 concurrent clients over both protocols mixing loss and train calls.

No error other than deliberate overload refusals, no lost or doubled optimizer step: the final
version equals the number of acknowledged train calls, each acknowledged with its own version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from load import report, run_load

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("max_queue", [256, 4], ids=["roomy-queue", "tight-queue"])
def test_load_mixed_protocols(max_queue: int) -> None:
    result, start, final = run_load(32, seconds=8.0, max_calls=40, max_queue=max_queue)
    print("\n".join(report(result, start, final)))
    assert result.calls > 32
    allowed = {"ok", "overloaded"}
    assert set(result.codes) <= allowed, result.codes
    assert result.codes["ok"] > 0
    assert result.duplicate_versions == 0
    assert final - start == len(result.acknowledged_train) > 0
    assert sorted(result.acknowledged_train) == list(range(start + 1, final + 1))
    if max_queue == 4:
        assert result.codes["overloaded"] > 0, "a 4-deep queue under 32 clients must shed load"
