"""Under bf16/fp16 autocast the LM head's matmul runs in the half dtype, but the log-sum-exp
and the sum over response tokens stay float32 (as ``linear_logps`` documents)."""

from __future__ import annotations

import pytest
import torch

from modern_llm.alignment.linear_logps import linear_token_logps
from modern_llm.alignment.logprobs import PairTokens, pair_logps
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_log_sum_exp_is_float32_on_half_logits(dtype: torch.dtype) -> None:
    """Compare with float64 math on the *same* half-precision logits: only the reduction's
    own rounding is left, ~1e-6 in float32. A reduction in the half dtype would be off by
    ~|lse|·2^-9 ≈ 1e-2 (bf16) — the check below shows the bound tells the two apart."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 64, 32, 4099  # several vocabulary blocks with chunk_size 8
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * 0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        got = linear_token_logps(hidden, targets, weight, chunk_size=8)
        logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype))
    assert got.dtype == torch.float32 and logits.dtype == dtype
    exact = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    err = (got.double() - exact).abs().max().item()
    assert err < 2e-5, err
    in_half = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)  # half math
    assert (in_half.double() - exact).abs().max().item() > 50 * 2e-5


def test_sequence_sums_are_float32_under_autocast() -> None:
    """The per-sequence sums of ``pair_logps`` equal a float64 sum of its own float32 token
    log-probs up to float32 rounding, under bf16 autocast."""
    cfg = ModernDecoderConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)
    model = ModernDecoderLM(cfg).eval()
    pairs = [PairTokens([1, *range(5, 25)], list(range(30, 230)), [7, 8, 9])]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = pair_logps(model, pairs, strategy="two_rows")
        hidden = model.hidden_states(torch.tensor([pairs[0].prompt + pairs[0].chosen]))
        h = hidden[0, len(pairs[0].prompt) - 1 : -1]
        tokens = linear_token_logps(h, torch.tensor(pairs[0].chosen), model.lm_head_weight, 2048)
    assert out.chosen.dtype == torch.float32 and tokens.dtype == torch.float32
    exact = tokens.double().sum().item()
    # 200 float32 additions of ~-5.6: error ≲ 200·|sum|·2^-24 ≈ 1e-2 worst case, ~1e-4
    # typical; a bf16 sum of -1100 would be off by up to 2 (its spacing there is 8).
    assert abs(out.chosen.item() - exact) < 1e-2
