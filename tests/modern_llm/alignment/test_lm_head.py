"""The two LM heads (chunked, stored) give the same values and gradients, equal to a float64
full log-softmax; ``head="auto"`` picks the stored head only for autograd within the memory
budget (asserted on ``SequenceLogps.head``, never on timing)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from modern_llm.alignment import linear_logps, lm_head
from modern_llm.alignment.linear_logps import (
    MEMORY_FRACTION,
    linear_token_logps,
    memory_budget_bytes,
    stored_head_bytes,
    stored_token_logps,
)
from modern_llm.alignment.logprobs import LmHead, LogpStrategy, PairTokens, pair_logps
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM

BOS, EOS, PAD = 256, 257, 258
LAYOUTS = [LogpStrategy.TWO_ROWS, LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE]
HUGE = 1 << 50  # a budget every test batch fits in


@pytest.fixture(scope="module")
def model() -> ModernDecoderLM:
    cfg = ModernDecoderConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1, seed=3
    )
    return ModernDecoderLM(cfg)


def make_pairs(lengths: list[tuple[int, int, int]], seed: int = 0) -> list[PairTokens]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 256, (n,), generator=g).tolist()

    return [
        PairTokens([BOS, *ids(p - 1)], [*ids(c - 1), EOS], [*ids(r - 1), EOS])
        for p, c, r in lengths
    ]


LENGTHS = [(1, 1, 1), (5, 3, 8), (30, 1, 2), (2, 17, 1), (9, 9, 9)]


def _head_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n, d, v = 37, 16, 1000
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[:3] = torch.tensor([0, v - 1, 6])  # first and last column
    return h, w, b, t, torch.randn(n, generator=g)


def test_stored_head_values_and_gradients_equal_float64_and_chunked() -> None:
    """With a bias and an uneven incoming gradient: values and all three gradients of the
    stored head equal a float64 full log-softmax, and the chunked head's."""
    h, w, b, t, upstream = _head_inputs(1)
    got = {}
    for name in ("stored", "chunked"):
        inputs = [x.clone().requires_grad_() for x in (h, w, b)]
        if name == "stored":
            out = stored_token_logps(inputs[0], t, inputs[1], inputs[2])
        else:
            out = linear_token_logps(inputs[0], t, inputs[1], 5, inputs[2])
        assert out.dtype == torch.float32
        got[name] = (out, *torch.autograd.grad(out, inputs, upstream))
    ref_in = [x.double().requires_grad_() for x in (h, w, b)]
    ref = F.log_softmax(ref_in[0] @ ref_in[1].T + ref_in[2], -1).gather(1, t[:, None])[:, 0]
    expected = (ref, *torch.autograd.grad(ref, ref_in, upstream.double()))
    for a, e, c in zip(got["stored"], expected, got["chunked"], strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_stored_head_equals_chunked_under_bf16_autocast() -> None:
    """Same matmul dtype (bf16), same float32 statistics: both heads equal a float64
    computation on the bf16-rounded inputs, up to the bf16 rounding of the matmul outputs,
    and their values and gradients stay float32."""
    h, w, _, t, upstream = _head_inputs(2)
    w = w * 0.2
    ref_in = [x.bfloat16().double().requires_grad_() for x in (h, w)]
    ref = F.log_softmax(ref_in[0] @ ref_in[1].T, -1).gather(1, t[:, None])[:, 0]
    expected = (ref, *torch.autograd.grad(ref, ref_in, upstream.double()))
    for stored in (True, False):
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stored_token_logps(hr, t, wr) if stored else linear_token_logps(hr, t, wr, 8)
        got = (out, *torch.autograd.grad(out, (hr, wr), upstream))
        for a, e in zip(got, expected, strict=True):
            assert a.dtype == torch.float32
            scale = e.abs().max().item()
            torch.testing.assert_close(a.double(), e, rtol=0, atol=2e-2 * scale)


def test_stored_head_keeps_one_vocab_wide_buffer_and_refuses_a_second_backward() -> None:
    h, w, _, t, _ = _head_inputs(3)
    hr = h.clone().requires_grad_()
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(x.shape), x.dtype))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = stored_token_logps(hr, t, w)
    wide = [s for s in saved if s[0] == (h.shape[0], w.shape[0])]
    assert wide == [((h.shape[0], w.shape[0]), torch.float32)]  # the softmax, once
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        out.sum().backward()
    assert stored_token_logps(h[:0], t[:0], w).shape == (0,)


def _grads(model: ModernDecoderLM, pairs: list[PairTokens], **kw: object) -> tuple:
    model.zero_grad(set_to_none=True)
    out = pair_logps(model, pairs, pad_id=PAD, **kw)  # type: ignore[arg-type]
    (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("strategy", LAYOUTS)
def test_pair_logps_heads_give_equal_values_and_gradients(
    model: ModernDecoderLM, strategy: LogpStrategy
) -> None:
    pairs = make_pairs(LENGTHS, seed=7)
    a, ga = _grads(model, pairs, strategy=strategy, chunk_size=5, head="chunked")
    b, gb = _grads(model, pairs, strategy=strategy, head="stored")
    assert (a.head, b.head) == (LmHead.CHUNKED, LmHead.STORED)
    torch.testing.assert_close(b.chosen, a.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.rejected, a.rejected, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() == {n for n, _ in model.named_parameters()}
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-5, msg=name)


def test_stored_head_gradients_match_float64_autograd(model: ModernDecoderLM) -> None:
    pairs = make_pairs([(3, 4, 2), (6, 1, 5)], seed=11)
    out, got = _grads(model, pairs, strategy=LogpStrategy.SHARED_PREFIX, head="stored")
    assert out.head is LmHead.STORED
    ref_model = copy.deepcopy(model).double()
    total = torch.zeros((), dtype=torch.float64)
    for p in pairs:
        for resp, weight in ((p.chosen, 1.0), (p.rejected, -0.5)):
            lp = F.log_softmax(ref_model(torch.tensor([p.prompt + resp]))["logits"][0], -1)
            n = len(p.prompt)
            total = total + weight * sum(lp[n - 1 + j, t] for j, t in enumerate(resp))
    total.backward()
    for name, param in ref_model.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(got[name].double(), param.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_auto_picks_stored_within_budget_and_chunked_beyond(model: ModernDecoderLM) -> None:
    pairs = make_pairs(LENGTHS, seed=2)
    n = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    vocab, d = model.lm_head_weight.shape
    need = stored_head_bytes(n, vocab, d, torch.float32)
    assert need == n * vocab * 4
    runs = {budget: _grads(model, pairs, memory_budget_bytes=budget) for budget in (need, need - 1)}
    assert runs[need][0].head is LmHead.STORED
    assert runs[need - 1][0].head is LmHead.CHUNKED
    torch.testing.assert_close(runs[need][0].chosen, runs[need - 1][0].chosen)
    for name, g in runs[need][1].items():
        torch.testing.assert_close(g, runs[need - 1][1][name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # no autograd: the chunked head streams, whatever the budget
        assert pair_logps(model, pairs, memory_budget_bytes=HUGE).head is LmHead.CHUNKED
    with torch.inference_mode():
        assert pair_logps(model, pairs, head="stored").head is LmHead.STORED  # explicit wins


def test_auto_without_budget_uses_the_device_budget(
    model: ModernDecoderLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = make_pairs(LENGTHS[:2], seed=4)
    assert _grads(model, pairs)[0].head is LmHead.STORED  # this machine has MBs to spare
    monkeypatch.setattr(lm_head, "device_memory_budget", lambda device: 0)  # no free memory
    assert _grads(model, pairs)[0].head is LmHead.CHUNKED


def test_bf16_estimate_counts_the_half_copies() -> None:
    assert stored_head_bytes(10, 100, 8, torch.bfloat16) == 10 * 100 * 6 + 100 * 8 * 2
    assert stored_head_bytes(10, 100, 8, torch.float16) == 10 * 100 * 6 + 100 * 8 * 2
    assert stored_head_bytes(10, 100, 8, torch.float64) == 10 * 100 * 4


def test_device_budget_is_a_fraction_of_available_memory() -> None:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    budget = memory_budget_bytes(torch.device("cpu"))
    assert 0 < budget <= MEMORY_FRACTION * total
    assert memory_budget_bytes(torch.device("meta")) == 0  # unknown device: chunked head


def test_cpu_budget_falls_back_to_sysconf(monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing:
        def __init__(self, *_: object) -> None:
            pass

        def read_text(self) -> str:
            raise OSError("no /proc here")

    monkeypatch.setattr(linear_logps, "Path", Missing)
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    got = linear_logps._available_cpu_bytes()
    assert got > 0 and abs(got - pages) < 0.5 * pages  # free pages move a little meanwhile


def test_bad_head_and_budget_are_refused(model: ModernDecoderLM) -> None:
    pairs = make_pairs([(2, 2, 2)])
    with pytest.raises(ValueError):
        pair_logps(model, pairs, head="logits")
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        pair_logps(model, pairs, memory_budget_bytes=-1)


def test_per_token_logps_with_the_stored_head(model: ModernDecoderLM) -> None:
    pairs = make_pairs(LENGTHS, seed=9)
    out = pair_logps(model, pairs, head="stored", return_token_logps=True)
    assert out.head is LmHead.STORED and out.chosen_token_logps is not None
    assert out.rejected_token_logps is not None
    for i, p in enumerate(pairs):
        assert out.chosen_token_logps[i].shape == (len(p.chosen),)
        torch.testing.assert_close(out.chosen_token_logps[i].sum(), out.chosen[i])
        torch.testing.assert_close(out.rejected_token_logps[i].sum(), out.rejected[i])
    (out.chosen_token_logps[0].sum()).backward()  # differentiable like the sums
    assert model.lm_head_weight.grad is not None
    model.zero_grad(set_to_none=True)
