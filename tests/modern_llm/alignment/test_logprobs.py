"""Tests for modern_llm.alignment.logprobs against an independent float64 reference."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modern_llm.alignment import linear_logps
from modern_llm.alignment.linear_logps import linear_token_logps
from modern_llm.alignment.logprobs import (
    CausalLM,
    LogpStrategy,
    PairTokens,
    SequenceLogps,
    build_shared_prefix_layout,
    pair_logps,
    resolve_strategy,
    shared_prefix_mask,
)
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM

BOS, EOS, PAD = 256, 257, 258
STRATEGIES = [LogpStrategy.TWO_ROWS, LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE]


def naive_pair_logps_float64(model: ModernDecoderLM, pairs: Sequence[PairTokens]) -> SequenceLogps:
    """Textbook reference: one sequence at a time, float64 copy, full log_softmax, gather, sum."""
    ref = copy.deepcopy(model).double().eval()

    def seq_logp(prompt: list[int], response: list[int]) -> float:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            log_probs = F.log_softmax(ref(ids)["logits"][0], dim=-1)  # (T, V)
        p = len(prompt)
        return sum(float(log_probs[p - 1 + j, tok]) for j, tok in enumerate(response))

    return SequenceLogps(
        chosen=torch.tensor([seq_logp(p.prompt, p.chosen) for p in pairs], dtype=torch.float64),
        rejected=torch.tensor([seq_logp(p.prompt, p.rejected) for p in pairs], dtype=torch.float64),
        chosen_tokens=torch.tensor([len(p.chosen) for p in pairs]),
        rejected_tokens=torch.tensor([len(p.rejected) for p in pairs]),
    )


@pytest.fixture(scope="module")
def model() -> ModernDecoderLM:
    cfg = ModernDecoderConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1, seed=1
    )
    return ModernDecoderLM(cfg)


def _tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=gen).tolist()


def make_pairs(lengths: Sequence[tuple[int, int, int]], seed: int = 0) -> list[PairTokens]:
    """Pairs with the given (prompt, chosen, rejected) lengths, BOS/EOS included."""
    g = torch.Generator().manual_seed(seed)
    return [
        PairTokens([BOS, *_tokens(g, p - 1)], [*_tokens(g, c - 1), EOS], [*_tokens(g, r - 1), EOS])
        for p, c, r in lengths
    ]


# Varied lengths: 1-token prompt and responses, and very different totals (padding).
LENGTHS = [(1, 1, 1), (5, 3, 8), (30, 1, 2), (2, 17, 1), (9, 9, 9)]


def assert_close_to(out: SequenceLogps, ref: SequenceLogps, atol: float = 1e-4) -> None:
    assert out.chosen.dtype == torch.float32 and out.chosen.shape == ref.chosen.shape
    torch.testing.assert_close(out.chosen.double(), ref.chosen, rtol=1e-5, atol=atol)
    torch.testing.assert_close(out.rejected.double(), ref.rejected, rtol=1e-5, atol=atol)
    assert torch.equal(out.chosen_tokens, ref.chosen_tokens)
    assert torch.equal(out.rejected_tokens, ref.rejected_tokens)
    assert out.chosen_tokens.dtype == torch.long


def test_model_satisfies_protocol(model: ModernDecoderLM) -> None:
    assert isinstance(model, CausalLM)


@pytest.mark.parametrize("strategy", [*STRATEGIES, LogpStrategy.AUTO, "shared_prefix"])
def test_matches_float64_reference(model: ModernDecoderLM, strategy: LogpStrategy | str) -> None:
    pairs = make_pairs(LENGTHS)
    ref = naive_pair_logps_float64(model, pairs)
    with torch.no_grad():
        out = pair_logps(model, pairs, strategy=strategy, pad_id=PAD)
    assert_close_to(out, ref)


def test_single_pair_and_pad_id_irrelevant(model: ModernDecoderLM) -> None:
    pairs = make_pairs([(4, 2, 6), (1, 1, 1)], seed=3)
    ref = naive_pair_logps_float64(model, pairs)
    for strategy in STRATEGIES:
        for pad in (0, PAD):
            with torch.no_grad():
                assert_close_to(pair_logps(model, pairs, strategy=strategy, pad_id=pad), ref)
        with torch.no_grad():
            assert_close_to(pair_logps(model, pairs[1:], strategy=strategy), _slice(ref, 1))


def _slice(s: SequenceLogps, start: int) -> SequenceLogps:
    return SequenceLogps(
        s.chosen[start:], s.rejected[start:], s.chosen_tokens[start:], s.rejected_tokens[start:]
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunk_size_does_not_change_result(model: ModernDecoderLM, strategy: LogpStrategy) -> None:
    pairs = make_pairs(LENGTHS, seed=5)
    with torch.inference_mode():
        outs = [pair_logps(model, pairs, strategy=strategy, chunk_size=c) for c in (1, 7, 10**9)]
    for other in outs[1:]:
        torch.testing.assert_close(other.chosen, outs[0].chosen, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(other.rejected, outs[0].rejected, rtol=1e-6, atol=1e-5)


def test_works_under_inference_mode(model: ModernDecoderLM) -> None:
    pairs = make_pairs(LENGTHS[:3], seed=2)
    with torch.inference_mode():
        out = pair_logps(model, pairs, chunk_size=3)
    assert not out.chosen.requires_grad
    assert_close_to(out, naive_pair_logps_float64(model, pairs))


def _grads(model: ModernDecoderLM, pairs: list[PairTokens], **kw: object) -> tuple:
    model.zero_grad(set_to_none=True)
    out = pair_logps(model, pairs, **kw)  # type: ignore[arg-type]
    (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("strategy", [LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE])
def test_prefix_sharing_values_and_gradients_equal_two_rows(
    model: ModernDecoderLM, strategy: LogpStrategy
) -> None:
    pairs = make_pairs(LENGTHS, seed=7)
    a, ga = _grads(model, pairs, strategy=LogpStrategy.TWO_ROWS, chunk_size=5)
    b, gb = _grads(model, pairs, strategy=strategy, chunk_size=5)
    torch.testing.assert_close(b.chosen, a.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.rejected, a.rejected, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() == {n for n, _ in model.named_parameters()}
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_skipping_padding_changes_no_value_or_gradient(
    model: ModernDecoderLM, strategy: LogpStrategy
) -> None:
    """Every layout passes the model a ``token_mask`` (per-token layers skip the padding);
    a model without ``supports_token_mask`` runs the padded rows: same values and gradients."""
    pairs = make_pairs(LENGTHS, seed=17)
    padded_model = copy.deepcopy(model)
    padded_model.supports_token_mask = False  # type: ignore[misc]
    calls: list[bool] = []
    original = model.hidden_states

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("token_mask") is not None)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    model.hidden_states = spy  # type: ignore[method-assign]
    try:
        a, ga = _grads(model, pairs, strategy=strategy, chunk_size=5, pad_id=PAD)
    finally:
        del model.hidden_states
    assert calls and all(calls)  # every pass of this ragged batch was packed
    b, gb = _grads(padded_model, pairs, strategy=strategy, chunk_size=5, pad_id=PAD)
    torch.testing.assert_close(a.chosen, b.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.rejected, b.rejected, rtol=1e-5, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_picks_prefix_cache_for_loss_only_and_shared_prefix_for_training(
    model: ModernDecoderLM,
) -> None:
    assert resolve_strategy(model, "auto", grad=False) is LogpStrategy.PREFIX_CACHE
    assert resolve_strategy(model, "auto", grad=True) is LogpStrategy.SHARED_PREFIX
    assert resolve_strategy(model, "two_rows", grad=False) is LogpStrategy.TWO_ROWS

    class NoCache:  # a CausalLM that cannot take a KV cache
        lm_head_weight = model.lm_head_weight

    no_cache: CausalLM = NoCache()  # type: ignore[assignment]
    assert resolve_strategy(no_cache, "auto", grad=False) is LogpStrategy.SHARED_PREFIX


def test_prefix_cache_with_single_token_responses(model: ModernDecoderLM) -> None:
    """All responses one token long: the response pass is skipped entirely."""
    pairs = make_pairs([(3, 1, 1), (7, 1, 1)], seed=4)
    ref = naive_pair_logps_float64(model, pairs)
    with torch.no_grad():
        assert_close_to(pair_logps(model, pairs, strategy=LogpStrategy.PREFIX_CACHE), ref)


def test_gradients_match_float64_autograd(model: ModernDecoderLM) -> None:
    """Chunked + checkpointed gradients equal a plain full-logits float64 computation."""
    pairs = make_pairs([(3, 4, 2), (6, 1, 5)], seed=11)
    _, got = _grads(model, pairs, strategy=LogpStrategy.SHARED_PREFIX, chunk_size=2)
    ref_model = copy.deepcopy(model).double()
    total = torch.zeros((), dtype=torch.float64)
    for p in pairs:
        for resp, w in ((p.chosen, 1.0), (p.rejected, -0.5)):
            lp = F.log_softmax(ref_model(torch.tensor([p.prompt + resp]))["logits"][0], -1)
            n = len(p.prompt)
            total = total + w * sum(lp[n - 1 + j, t] for j, t in enumerate(resp))
    total.backward()
    for name, param in ref_model.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(got[name].double(), param.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_rejected_is_blind_to_chosen_under_shared_prefix(model: ModernDecoderLM) -> None:
    pairs = make_pairs([(6, 5, 4), (2, 3, 7)], seed=13)
    changed = [
        PairTokens(p.prompt, [(t + 17) % 256 for t in p.chosen] + [EOS], p.rejected) for p in pairs
    ]
    with torch.no_grad():
        a = pair_logps(model, pairs, strategy=LogpStrategy.SHARED_PREFIX)
        b = pair_logps(model, changed, strategy=LogpStrategy.SHARED_PREFIX)
    torch.testing.assert_close(a.rejected, b.rejected, rtol=0, atol=1e-6)
    assert not torch.allclose(a.chosen, b.chosen)


def test_shared_prefix_layout_and_mask() -> None:
    pairs = [PairTokens([BOS, 1], [2, EOS], [3, 4, EOS]), PairTokens([BOS], [EOS], [EOS])]
    lay = build_shared_prefix_layout(pairs, pad_id=PAD)
    assert lay.input_ids.tolist() == [
        [BOS, 1, 2, EOS, 3, 4, EOS],
        [BOS, EOS, EOS, PAD, PAD, PAD, PAD],
    ]
    assert lay.position_ids is not None and lay.segments is not None
    assert lay.position_ids.tolist()[0] == [0, 1, 2, 3, 2, 3, 4]
    assert lay.position_ids.tolist()[1][:3] == [0, 1, 1]
    # chosen of pair 0 from positions 1,2; chosen of pair 1 from 7+0; rejected 1,4,5; 7+0.
    assert lay.gather_index.tolist() == [1, 2, 7, 1, 4, 5, 7]
    assert lay.targets.tolist() == [2, EOS, EOS, 3, 4, EOS, EOS]
    assert lay.sequence.tolist() == [0, 0, 1, 2, 2, 2, 3]
    mask = shared_prefix_mask(lay.segments)[0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected: prompt + itself, not chosen
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
    ]
    assert shared_prefix_mask(lay.segments).any(-1).all()  # no empty row (pads too)


def test_linear_token_logps_keeps_no_vocab_wide_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, v = 64, 16, 1000
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    ref = F.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = linear_token_logps(hidden, targets, weight, chunk_size=8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Backward keeps the inputs and one log-sum-exp per row, never a (rows, V) logits tensor.
    assert saved and all(shape[-1] != v for shape in saved)
    assert (v, d) in saved  # the weight is saved (by reference), as expected
    gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
def test_linear_token_logps_blocks_match_float64(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Many row chunks × vocabulary blocks (tiny blocks forced), with a bias and an uneven
    incoming gradient: values and all three gradients equal a float64 full log-softmax."""
    monkeypatch.setattr(linear_logps, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(linear_logps, "_MIN_COLUMNS", 7)
    assert len(linear_logps._blocks(chunk, 1000)) > 10
    g = torch.Generator().manual_seed(1)
    n, d, v = 37, 16, 1000
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[:3] = torch.tensor([0, v - 1, 6])  # first and last column, a block edge
    upstream = torch.randn(n, generator=g)
    inputs = [x.clone().requires_grad_() for x in (h, w, b)]
    out = linear_token_logps(inputs[0], t, inputs[1], chunk, inputs[2])
    got = torch.autograd.grad(out, inputs, upstream)
    ref_in = [x.double().requires_grad_() for x in (h, w, b)]
    ref = F.log_softmax(ref_in[0] @ ref_in[1].T + ref_in[2], -1).gather(1, t[:, None])[:, 0]
    expected = torch.autograd.grad(ref, ref_in, upstream.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_linear_token_logps_under_bf16_autocast_keeps_float32_statistics() -> None:
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(20, 32, generator=g), torch.randn(300, 32, generator=g) * 0.2
    t = torch.randint(0, 300, (20,), generator=g)
    hr = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_token_logps(hr, t, w, chunk_size=8)
    assert out.dtype == torch.float32
    ref = F.log_softmax(h.double() @ w.double().T, -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.1)  # bf16 matmul inputs
    out.sum().backward()
    assert hr.grad is not None and hr.grad.dtype == torch.float32


def test_linear_token_logps_rejects_bad_chunk_and_handles_empty() -> None:
    w = torch.randn(10, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logps(torch.randn(2, 4), torch.tensor([1, 2]), w, chunk_size=0)
    empty = linear_token_logps(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), w, 4)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_input_validation(model: ModernDecoderLM) -> None:
    good = PairTokens([BOS], [EOS], [EOS])
    with pytest.raises(ValueError):
        pair_logps(model, [])
    with pytest.raises(ValueError, match="chosen"):
        pair_logps(model, [PairTokens([BOS], [], [EOS])])
    with pytest.raises(ValueError, match="prompt"):
        pair_logps(model, [good, PairTokens([], [EOS], [EOS])])
    with pytest.raises(ValueError, match="outside"):
        pair_logps(model, [PairTokens([BOS], [259], [EOS])])
    with pytest.raises(ValueError, match="chunk_size"):
        pair_logps(model, [good], chunk_size=0)
    with pytest.raises(ValueError):
        pair_logps(model, [good], strategy="three_rows")


_len = st.integers(min_value=1, max_value=12)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lengths=st.lists(st.tuples(_len, _len, _len), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
    chunk=st.integers(1, 40),
)
def test_strategies_agree_property(
    model: ModernDecoderLM, lengths: list[tuple[int, int, int]], seed: int, chunk: int
) -> None:
    pairs = make_pairs(lengths, seed=seed)
    with torch.inference_mode():
        a = pair_logps(model, pairs, strategy=LogpStrategy.TWO_ROWS, chunk_size=chunk)
        for strategy in (LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE):
            b = pair_logps(model, pairs, strategy=strategy, chunk_size=chunk)
            torch.testing.assert_close(b.chosen, a.chosen, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(b.rejected, a.rejected, rtol=1e-5, atol=1e-4)
