"""Per-token response log-probs (``pair_logps(..., return_token_logps=True)``).

Checked for every layout against a naive float64 reference (one sequence at a time, full
log-softmax, the same pattern as test_logprobs.py), against the layout's own sums, and for
gradients: asking for token log-probs changes nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modern_llm.alignment.logprobs import LogpStrategy, PairTokens, SequenceLogps, pair_logps
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM

BOS, EOS, PAD = 256, 257, 258
LAYOUTS = [LogpStrategy.TWO_ROWS, LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE]
LENGTHS = [(1, 1, 1), (5, 3, 8), (30, 1, 2), (2, 17, 1), (9, 9, 9)]


@pytest.fixture(scope="module")
def model() -> ModernDecoderLM:
    cfg = ModernDecoderConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1, seed=3
    )
    return ModernDecoderLM(cfg)


def make_pairs(lengths: Sequence[tuple[int, int, int]], seed: int = 0) -> list[PairTokens]:
    """Pairs with the given (prompt, chosen, rejected) lengths, BOS/EOS included."""
    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(0, 256, (n,), generator=g).tolist()

    return [
        PairTokens([BOS, *toks(p - 1)], [*toks(c - 1), EOS], [*toks(r - 1), EOS])
        for p, c, r in lengths
    ]


def naive_token_logps_float64(
    model: ModernDecoderLM, pairs: Sequence[PairTokens]
) -> tuple[list[list[float]], list[list[float]]]:
    """Textbook reference: one sequence at a time, float64 copy, full log_softmax, gather."""
    ref = copy.deepcopy(model).double().eval()

    def tokens(prompt: list[int], response: list[int]) -> list[float]:
        with torch.no_grad():
            log_probs = F.log_softmax(ref(torch.tensor([prompt + response]))["logits"][0], -1)
        p = len(prompt)
        return [float(log_probs[p - 1 + j, tok]) for j, tok in enumerate(response)]

    return [tokens(p.prompt, p.chosen) for p in pairs], [
        tokens(p.prompt, p.rejected) for p in pairs
    ]


def check_tokens(out: SequenceLogps, pairs: Sequence[PairTokens]) -> None:
    """Shapes and dtype of the per-token lists, and that they sum to the sequence log-probs."""
    assert out.chosen_token_logps is not None and out.rejected_token_logps is not None
    for side, sums, toks in (
        ("chosen", out.chosen, out.chosen_token_logps),
        ("rejected", out.rejected, out.rejected_token_logps),
    ):
        assert len(toks) == len(pairs)
        for i, (pair, t) in enumerate(zip(pairs, toks, strict=True)):
            assert t.dtype == torch.float32 and t.dim() == 1, (side, i)
            assert t.shape[0] == len(getattr(pair, side)), (side, i)
            torch.testing.assert_close(
                t.double().sum(), sums[i].double(), rtol=1e-6, atol=2e-5, msg=f"{side} {i}"
            )


@pytest.mark.parametrize("strategy", [*LAYOUTS, LogpStrategy.AUTO])
def test_token_logps_match_float64_reference_and_sum_to_sequences(
    model: ModernDecoderLM, strategy: LogpStrategy
) -> None:
    pairs = make_pairs(LENGTHS)
    ref_chosen, ref_rejected = naive_token_logps_float64(model, pairs)
    with torch.no_grad():
        out = pair_logps(model, pairs, strategy=strategy, pad_id=PAD, return_token_logps=True)
    check_tokens(out, pairs)
    assert out.chosen_token_logps is not None and out.rejected_token_logps is not None
    for got, want in zip(
        out.chosen_token_logps + out.rejected_token_logps, ref_chosen + ref_rejected, strict=True
    ):
        torch.testing.assert_close(
            got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5
        )


def test_off_by_default_and_sums_unchanged(model: ModernDecoderLM) -> None:
    pairs = make_pairs(LENGTHS, seed=1)
    for strategy in LAYOUTS:
        with torch.no_grad():
            plain = pair_logps(model, pairs, strategy=strategy)
            asked = pair_logps(model, pairs, strategy=strategy, return_token_logps=True)
        assert plain.chosen_token_logps is None and plain.rejected_token_logps is None
        assert torch.equal(plain.chosen, asked.chosen) and torch.equal(
            plain.rejected, asked.rejected
        )


def _param_grads(model: ModernDecoderLM, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("strategy", LAYOUTS)
def test_gradients_unaffected(model: ModernDecoderLM, strategy: LogpStrategy) -> None:
    """The sums' gradients are the same with the option on, and back-propagating through the
    per-token tensors' sums gives the sums' gradients."""
    pairs = make_pairs([(3, 4, 2), (6, 1, 5), (2, 7, 7)], seed=2)

    def run(tokens: bool) -> SequenceLogps:
        return pair_logps(model, pairs, strategy=strategy, chunk_size=3, return_token_logps=tokens)

    off = run(False)
    base = _param_grads(model, off.chosen.sum() - 0.5 * off.rejected.sum())
    on = run(True)
    same = _param_grads(model, on.chosen.sum() - 0.5 * on.rejected.sum())
    on = run(True)
    assert on.chosen_token_logps is not None and on.rejected_token_logps is not None
    via_tokens = _param_grads(
        model,
        sum(t.sum() for t in on.chosen_token_logps)
        - 0.5 * sum(t.sum() for t in on.rejected_token_logps),  # type: ignore[operator]
    )
    assert base.keys() == same.keys() == via_tokens.keys()
    for name in base:
        torch.testing.assert_close(same[name], base[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(via_tokens[name], base[name], rtol=1e-4, atol=1e-6, msg=name)


def test_token_weighted_loss_gradient_matches_float64_autograd(model: ModernDecoderLM) -> None:
    """What a client may do with the per-token values: weight tokens. Its gradient equals the
    same weighted sum over a float64 full-logits model."""
    pairs = make_pairs([(3, 4, 2), (5, 2, 3)], seed=4)
    weights = [[0.5, -1.0, 2.0, 0.25], [1.5, 0.0]], [[3.0, -0.5], [1.0, 1.0, -2.0]]
    out = pair_logps(
        model, pairs, strategy=LogpStrategy.SHARED_PREFIX, chunk_size=2, return_token_logps=True
    )
    assert out.chosen_token_logps is not None and out.rejected_token_logps is not None
    loss = sum(
        (torch.tensor(w) * t).sum()
        for side, toks in zip(
            weights, (out.chosen_token_logps, out.rejected_token_logps), strict=True
        )
        for w, t in zip(side, toks, strict=True)
    )
    got = _param_grads(model, loss)  # type: ignore[arg-type]
    ref = copy.deepcopy(model).double()
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(pairs):
        for resp, w in ((p.chosen, weights[0][i]), (p.rejected, weights[1][i])):
            lp = F.log_softmax(ref(torch.tensor([p.prompt + resp]))["logits"][0], -1)
            n = len(p.prompt)
            total = total + sum(
                wj * lp[n - 1 + j, t] for j, (t, wj) in enumerate(zip(resp, w, strict=True))
            )
    total.backward()
    for name, param in ref.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(got[name].double(), param.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_single_token_responses_and_inference_mode(model: ModernDecoderLM) -> None:
    """PREFIX_CACHE skips the response pass when every response is one token long."""
    pairs = make_pairs([(3, 1, 1), (7, 1, 1)], seed=5)
    ref_chosen, ref_rejected = naive_token_logps_float64(model, pairs)
    with torch.inference_mode():
        out = pair_logps(model, pairs, strategy=LogpStrategy.PREFIX_CACHE, return_token_logps=True)
    check_tokens(out, pairs)
    assert out.chosen_token_logps is not None and out.rejected_token_logps is not None
    assert not out.chosen_token_logps[0].requires_grad
    got = [float(t) for t in out.chosen_token_logps + out.rejected_token_logps]
    assert got == pytest.approx([x for r in ref_chosen + ref_rejected for x in r], abs=1e-5)


_len = st.integers(min_value=1, max_value=10)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lengths=st.lists(st.tuples(_len, _len, _len), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
    chunk=st.integers(1, 20),
)
def test_layouts_agree_token_by_token(
    model: ModernDecoderLM, lengths: list[tuple[int, int, int]], seed: int, chunk: int
) -> None:
    pairs = make_pairs(lengths, seed=seed)
    with torch.inference_mode():
        outs = [
            pair_logps(model, pairs, strategy=s, chunk_size=chunk, return_token_logps=True)
            for s in LAYOUTS
        ]
    for out in outs:
        check_tokens(out, pairs)
    first = outs[0]
    assert first.chosen_token_logps is not None and first.rejected_token_logps is not None
    for other in outs[1:]:
        assert other.chosen_token_logps is not None and other.rejected_token_logps is not None
        for a, b in zip(
            first.chosen_token_logps + first.rejected_token_logps,
            other.chosen_token_logps + other.rejected_token_logps,
            strict=True,
        ):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
