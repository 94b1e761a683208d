"""Length bucketing of the engine (``training.micro_batches``) and ``forward_logps``."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_service.engine.forward import forward_logps, micro_batches, strategy_for
from dpo_service.engine.train_state import TrainState
from dpo_service.models.bundle import ByteTripleTokenizer, ModelBundle
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import LogpStrategy, PairTokens, pair_logps
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM


def _pairs(lengths: list[tuple[int, int, int]], seed: int = 0) -> list[PairTokens]:
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(256) for _ in range(n)]  # noqa: E731
    return [PairTokens(ids(p), ids(c), ids(r)) for p, c, r in lengths]


def _cost(pairs: list[PairTokens], groups: list[list[int]], overhead: int) -> int:
    total = lambda i: len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected)  # noqa: E731
    return sum(len(g) * max(total(i) for i in g) + overhead for g in groups)


_len = st.integers(1, 40)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(_len, _len, _len), min_size=1, max_size=7),
    budget=st.integers(1, 300),
    overhead=st.integers(0, 100),
)
def test_micro_batches_cover_respect_budget_and_are_optimal(
    lengths: list[tuple[int, int, int]], budget: int, overhead: int
) -> None:
    pairs = _pairs(lengths)
    groups = micro_batches(pairs, budget, overhead=overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(pairs)))
    total = [sum(x) for x in lengths]
    for g in groups:
        assert len(g) == 1 or len(g) * max(total[i] for i in g) <= budget
    # No split of the length-sorted order into feasible runs is cheaper (brute force).
    order = sorted(range(len(pairs)), key=total.__getitem__)
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        split, cur = [], [order[0]]
        for i, cut in zip(order[1:], cuts, strict=True):
            if cut:
                split.append(cur)
                cur = []
            cur.append(i)
        split.append(cur)
        if all(len(g) == 1 or len(g) * max(total[i] for i in g) <= budget for g in split):
            c = _cost(pairs, split, overhead)
            best = c if best is None else min(best, c)
    assert best is not None and _cost(pairs, groups, overhead) == best


def test_micro_batches_split_mixed_lengths_and_keep_equal_ones_together() -> None:
    short, long = (10, 5, 5), (200, 100, 100)
    mixed = _pairs([short] * 4 + [long] * 4)
    groups = micro_batches(mixed, budget=10_000)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batches(_pairs([short] * 8), budget=10_000) == [list(range(8))]


@pytest.fixture(scope="module")
def state() -> TrainState:
    cfg = ModernDecoderConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.1)
    model = ModernDecoderLM(cfg).eval()
    bundle = ModelBundle(model, ByteTripleTokenizer(), "t", "builtin", 259, cfg.max_seq_len)
    return TrainState.create(bundle, Settings())


@pytest.mark.parametrize("strategy", ["auto", "two_rows", "shared_prefix"])
def test_forward_logps_in_micro_batches_equals_one_pair_at_a_time(
    state: TrainState, strategy: str
) -> None:
    pairs = _pairs([(3, 4, 2), (30, 2, 9), (1, 1, 1), (12, 20, 5), (8, 8, 8)], seed=3)
    settings_ = Settings(max_batch_tokens=40, logp_strategy=strategy, logp_chunk_size=3)
    model = state.bundle.causal_lm
    with torch.inference_mode():
        got = forward_logps(model, pairs, settings_, state.bundle)
        for i, p in enumerate(pairs):
            one = pair_logps(model, [p], strategy=LogpStrategy.TWO_ROWS)
            torch.testing.assert_close(got.chosen[i], one.chosen[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.rejected[i], one.rejected[0], rtol=1e-5, atol=1e-5)
            assert int(got.chosen_tokens[i]) == len(p.chosen)


def test_strategy_for_passes_auto_through(state: TrainState) -> None:
    assert strategy_for(Settings(), state.bundle) is LogpStrategy.AUTO
    assert strategy_for(Settings(logp_strategy="two_rows")) is LogpStrategy.TWO_ROWS
