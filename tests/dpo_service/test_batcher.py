"""Dynamic batching in the engine: concurrent loss-only requests share forward passes, each
caller gets exactly its own rows, train requests are never merged and keep arrival order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import API_KEY, small_settings
from dpo_service.engine.admission import Admission, make_admission
from dpo_service.schemas import LossRequest


def _request(i: int, *, train: bool = False) -> LossRequest:
    return LossRequest.model_validate(
        {
            "pairs": [
                {
                    "prompt": f"prompt {i} " + "x" * (i % 5),
                    "chosen": f" yes {i}",
                    "rejected": " no" * (1 + i % 3),
                }
            ],
            "train": train,
        }
    )


async def _core(**overrides: Any) -> Admission:
    core = make_admission(small_settings(**overrides))
    await core.start()
    return core


def _batch_sizes(core: Admission) -> list[float]:
    """Observed requests-per-forward-pass values (from the histogram's sum and count)."""
    metric = core.engine.events.batch_requests
    samples = {s.name: s.value for m in metric.collect() for s in m.samples}
    return [samples["dpo_batch_requests_sum"], samples["dpo_batch_requests_count"]]


async def test_concurrent_requests_are_coalesced_and_get_their_own_rows() -> None:
    core = await _core(max_wait_ms=50.0)
    try:
        solo = [await core.compute(_request(i), api_key=None) for i in range(16)]
        passes_before = _batch_sizes(core)[1]
        together = await asyncio.gather(
            *(core.compute(_request(i), api_key=None) for i in range(16))
        )
        total, passes = _batch_sizes(core)
        assert passes - passes_before < 16, "16 concurrent requests should share forward passes"
        assert total == 16 + 16  # every request counted once, solo and together
        for a, b in zip(solo, together, strict=True):
            assert b.chosen_logps == pytest.approx(a.chosen_logps, abs=1e-4)
            assert b.rejected_logps == pytest.approx(a.rejected_logps, abs=1e-4)
            assert b.loss == pytest.approx(a.loss, abs=1e-5)
            assert b.chosen_tokens == a.chosen_tokens
    finally:
        await core.engine.stop()


async def test_batching_off_runs_one_request_per_pass() -> None:
    core = await _core(dynamic_batching=False, max_wait_ms=50.0)
    try:
        await asyncio.gather(*(core.compute(_request(i), api_key=None) for i in range(8)))
        total, passes = _batch_sizes(core)
        assert passes == 8 and total == 8
    finally:
        await core.engine.stop()


async def test_train_requests_are_never_merged_and_keep_order() -> None:
    """Interleaved train and loss requests: every train request gets its own step, and the
    versions follow arrival order; loss requests see the version of their moment."""
    core = await _core(max_wait_ms=20.0)
    try:
        calls = [core.compute(_request(i, train=i % 2 == 0), api_key=API_KEY) for i in range(10)]
        results = await asyncio.gather(*calls)
        trained = [r for r in results if r.trained]
        assert [r.new_model_version for r in trained] == [1, 2, 3, 4, 5]
        # a loss request sent right after train request k sees version k+1
        for i in range(1, 10, 2):
            assert results[i].model_version == results[i - 1].new_model_version
    finally:
        await core.engine.stop()
