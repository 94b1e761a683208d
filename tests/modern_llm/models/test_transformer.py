"""Tests for modern_llm.models.transformer (tiny configs only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from modern_llm.models import blocks
from modern_llm.models.transformer import (
    Attention,
    ModernDecoderConfig,
    ModernDecoderLM,
    RMSNorm,
    apply_rope,
)

V = 259


def tiny_config(**overrides: object) -> ModernDecoderConfig:
    base: dict[str, object] = {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 64,
        "init_std": 0.1,
    }
    base.update(overrides)
    return ModernDecoderConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model() -> ModernDecoderLM:
    return ModernDecoderLM(tiny_config()).eval()


def rand_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_ffn_rounding() -> None:
    cfg = ModernDecoderConfig()
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (
        259,
        256,
        4,
        8,
        2,
    )
    assert cfg.ffn_dim == 704  # 8/3·256 = 682.7 → next multiple of 64
    assert ModernDecoderConfig(d_model=32, n_heads=4).ffn_dim == 128
    assert ModernDecoderConfig(ffn_hidden=100).ffn_dim == 100
    assert cfg.head_dim == 32


@pytest.mark.parametrize(
    "kwargs",
    [
        {"d_model": 30, "n_heads": 4},
        {"n_heads": 8, "n_kv_heads": 3},
        {"d_model": 24, "n_heads": 8, "n_kv_heads": 2},  # head_dim 3 is odd
        {"vocab_size": 0},
        {"n_layers": -1},
        {"ffn_hidden": 0},
        {"norm_eps": 0.0},
        {"rope_theta": -1.0},
        {"d_model": 32.0},
    ],
)
def test_config_rejects_invalid(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModernDecoderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_dict_round_trip_and_unknown_keys() -> None:
    cfg = tiny_config(seed=7, tie_embeddings=False)
    assert ModernDecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ModernDecoderConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


# ----------------------------------------------------------------------------- forward


def test_shapes_and_lm_head(model: ModernDecoderLM) -> None:
    ids = rand_ids(3, 9)
    out = model(ids)
    assert out["logits"].shape == (3, 9, V)
    assert out["loss"] is None
    assert model.hidden_states(ids).shape == (3, 9, 32)
    assert model.lm_head_weight is model.embed_tokens.weight
    untied = ModernDecoderLM(tiny_config(tie_embeddings=False))
    assert untied.lm_head_weight.shape == (V, 32)
    assert untied.lm_head_weight is not untied.embed_tokens.weight
    assert untied.num_parameters() == model.num_parameters() + V * 32


def test_causality(model: ModernDecoderLM) -> None:
    ids = rand_ids(2, 12)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % V
    a, b = model(ids)["logits"], model(changed)["logits"]
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_right_padding_invariance(model: ModernDecoderLM) -> None:
    rows = [rand_ids(1, n, seed=n)[0] for n in (5, 11, 8)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 258)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    batched = model(ids, attention_mask=mask)["logits"]
    for i, r in enumerate(rows):
        single = model(r[None])["logits"][0]
        torch.testing.assert_close(batched[i, : len(r)], single, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batched).all()


def test_left_padding_with_position_ids(model: ModernDecoderLM) -> None:
    rows = [rand_ids(1, n, seed=10 + n)[0] for n in (4, 9)]
    width = 9
    ids = torch.full((2, width), 258)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    batched = model(ids, attention_mask=mask, position_ids=pos)["logits"]
    assert torch.isfinite(batched).all()  # fully masked pad queries attend to themselves
    for i, r in enumerate(rows):
        single = model(r[None])["logits"][0]
        torch.testing.assert_close(batched[i, width - len(r) :], single, rtol=1e-5, atol=1e-5)


def test_explicit_mask_with_empty_row_is_finite(model: ModernDecoderLM) -> None:
    ids = rand_ids(1, 5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None]
    masked = causal.clone()
    masked[0, 3] = False  # query 3 may attend nothing
    h_causal = model.hidden_states(ids, attn_mask=causal)
    h = model.hidden_states(ids, attn_mask=masked)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h_causal, model.hidden_states(ids), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h[:, :3], h_causal[:, :3], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        model.hidden_states(ids, attn_mask=causal.float())


def test_kv_cache_matches_full_forward(model: ModernDecoderLM) -> None:
    ids = rand_ids(2, 10)
    full = model.hidden_states(ids)
    h1, cache = model.hidden_states(ids[:, :6], use_cache=True)
    h2, cache = model.hidden_states(ids[:, 6:9], past_key_values=cache, use_cache=True)
    h3 = model.hidden_states(ids[:, 9:], past_key_values=cache)
    torch.testing.assert_close(torch.cat([h1, h2, h3], 1), full, rtol=1e-5, atol=1e-5)
    assert cache[0][0].shape == (2, 2, 9, 8)  # (B, n_kv_heads, S, head_dim)


def test_kv_cache_tiled_over_a_larger_batch(model: ModernDecoderLM) -> None:
    """A cache of batch B continues 2B rows (row i uses cache row i mod B), as if repeated."""
    prompt, cont = rand_ids(2, 5, seed=1), rand_ids(4, 3, seed=2)
    _, cache = model.hidden_states(prompt, use_cache=True)
    repeated = [(k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1)) for k, v in cache]
    tiled = model.hidden_states(cont, past_key_values=cache)
    torch.testing.assert_close(tiled, model.hidden_states(cont, past_key_values=repeated))
    for i in range(4):  # and each row equals its own full forward
        full = model.hidden_states(torch.cat([prompt[i % 2], cont[i]])[None])[0, 5:]
        torch.testing.assert_close(tiled[i], full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        model.hidden_states(rand_ids(3, 2), past_key_values=cache)


def _ragged(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) (pad 258) and the real-token mask (B, T)."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), 258)
    for i, n in enumerate(lengths):
        ids[i, :n] = rand_ids(n, seed=seed + i)
    return ids, torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def test_token_mask_skips_padding_with_equal_hidden_states_and_cache(
    model: ModernDecoderLM,
) -> None:
    """Per-token layers on the real tokens only: the real positions' hidden states and KV
    cache equal the padded forward's; padding gets zeros (finite)."""
    ids, real = _ragged((5, 11, 1, 8))
    padded, cache = model.hidden_states(ids, use_cache=True)
    packed, packed_cache = model.hidden_states(ids, use_cache=True, token_mask=real)
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-6)
    assert packed[~real].abs().max() == 0
    for (k, v), (pk, pv) in zip(cache, packed_cache, strict=True):
        torch.testing.assert_close(pk.transpose(1, 2)[real], k.transpose(1, 2)[real])
        torch.testing.assert_close(pv.transpose(1, 2)[real], v.transpose(1, 2)[real])
        assert pk.transpose(1, 2)[~real].abs().max() == 0
    # with an explicit mask and a tiled cache (the prefix-cache response pass)
    cont, cont_real = _ragged((3, 1, 2, 3, 1, 2, 3, 1), seed=40)
    q = torch.arange(3)
    own = (q[None, :] <= q[:, None])[None].expand(8, 3, 3)
    mask = torch.cat((real.repeat(2, 1)[:, None, :].expand(8, 3, 11), own), -1)
    pos = real.sum(1).repeat(2)[:, None] + q[None, :]
    kw = {"attn_mask": mask, "position_ids": pos, "past_key_values": cache}
    plain = model.hidden_states(cont, **kw)
    got = model.hidden_states(cont, token_mask=cont_real, **kw)
    torch.testing.assert_close(got[cont_real], plain[cont_real], rtol=1e-5, atol=1e-6)


def test_token_mask_gradients_equal_the_padded_forward() -> None:
    m = ModernDecoderLM(tiny_config(tie_embeddings=False)).train()
    ids, real = _ragged((6, 2, 9), seed=7)
    weights = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for token_mask in (None, real):
        m.zero_grad(set_to_none=True)
        h = m.hidden_states(ids, token_mask=token_mask)
        (h * weights)[real].sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    every = {n for n, _ in m.named_parameters()} - {"lm_head.weight"}  # not in hidden_states
    assert grads[0].keys() == grads[1].keys() == every
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_token_mask_is_validated(model: ModernDecoderLM) -> None:
    ids, real = _ragged((3, 2))
    with pytest.raises(ValueError, match="token_mask"):
        model.hidden_states(ids, token_mask=real.long())
    with pytest.raises(ValueError, match="token_mask"):
        model.hidden_states(ids, token_mask=real[:, :2])


def test_masked_gqa_repeat_path_equals_native_kernel(
    model: ModernDecoderLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA fallback (K/V repeated per query group) gives the CPU kernel's numbers."""
    ids = rand_ids(2, 7)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
    mask[1, 4:, 1:3] = False
    native = model.hidden_states(ids, attn_mask=mask)
    monkeypatch.setattr(blocks, "use_gqa_kernel", lambda device, has_mask: False)
    torch.testing.assert_close(model.hidden_states(ids, attn_mask=mask), native)


def test_rmsnorm_fused_and_upcast_paths_agree() -> None:
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(3, 5, 16)
    manual = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), manual)
    bf = norm.bfloat16()(x.bfloat16())  # low precision: upcast, normalise, cast back
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), manual, rtol=2e-2, atol=2e-2)


def test_apply_rope_equals_rotate_half_formula() -> None:
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    angles = torch.randn(2, 5, 1, 4, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.chunk(2, -1)
    expected = x * cos + torch.cat((-x2, x1), -1) * sin
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=1e-12, atol=1e-12)


def test_swiglu_in_place_inference_path_equals_autograd_path() -> None:
    m = ModernDecoderLM(tiny_config())
    x = torch.randn(2, 4, 32)
    mlp = m.layers[0].mlp
    with_grad = mlp(x)
    assert with_grad.requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), with_grad.detach(), rtol=0, atol=0)


def test_max_seq_len_enforced(model: ModernDecoderLM) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        model.hidden_states(rand_ids(1, 65))


def test_gqa_attention_matches_naive_float64() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(n_heads=4, n_kv_heads=2)
    m = ModernDecoderLM(cfg).double()
    attn = m.layers[0].attn
    assert isinstance(attn, Attention)
    b, t, hd = 2, 6, cfg.head_dim
    x = torch.randn(b, t, cfg.d_model, dtype=torch.float64)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = m._rope(pos, torch.float64)
    out, _ = attn(x, cos, sin, None, True, None)

    q = apply_rope(attn.q_proj(x).view(b, t, 4, hd), cos, sin).transpose(1, 2)
    k = apply_rope(attn.k_proj(x).view(b, t, 2, hd), cos, sin).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, 2, hd).transpose(1, 2)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    heads = []
    for h in range(4):
        kv = h // 2  # query heads 0,1 share kv head 0; 2,3 share kv head 1
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, kv])
    ref = attn.o_proj(torch.stack(heads, 1).transpose(1, 2).reshape(b, t, 4 * hd))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_rope_relative_position_property() -> None:
    m = ModernDecoderLM(tiny_config()).double()
    q, k = (
        torch.randn(1, 1, 1, 8, dtype=torch.float64),
        torch.randn(1, 1, 1, 8, dtype=torch.float64),
    )

    def score(i: int, j: int) -> float:
        ci, si = m._rope(torch.tensor([[i]]), torch.float64)
        cj, sj = m._rope(torch.tensor([[j]]), torch.float64)
        return float((apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-9)


# --------------------------------------------------------------------------- init / loss


def test_deterministic_init_and_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    a, b = ModernDecoderLM(tiny_config(seed=3)), ModernDecoderLM(tiny_config(seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    c = ModernDecoderLM(tiny_config(seed=4))
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)
    assert torch.equal(a.norm.weight, torch.ones(32))


def test_loss_equals_manual_cross_entropy(model: ModernDecoderLM) -> None:
    ids = rand_ids(2, 7)
    labels = ids.clone()
    labels[0, 2] = -100
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out["logits"]
    terms = []
    for i in range(2):
        for t in range(1, 7):
            if labels[i, t] != -100 and mask[i, t]:
                terms.append(-F.log_softmax(logits[i, t - 1], -1)[labels[i, t]])
    assert out["loss"] is not None
    torch.testing.assert_close(out["loss"], torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    no_mask = model(ids, labels=ids)["loss"]
    ref = F.cross_entropy(model(ids)["logits"][:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert no_mask is not None
    torch.testing.assert_close(no_mask, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = ModernDecoderLM(tiny_config(seed=5)).eval()
    with torch.no_grad():
        m.norm.weight.mul_(1.5)  # not the init value
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert "embed_tokens.weight" in keys and not any(k.startswith("lm_head") for k in keys)

    def no_pickle(*_a: object, **_k: object) -> None:
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = ModernDecoderLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == m.config
    ids = rand_ids(2, 9)
    assert torch.equal(loaded(ids)["logits"], m(ids)["logits"])
    assert loaded.lm_head_weight is loaded.embed_tokens.weight


def test_save_load_untied(tmp_path: Path) -> None:
    m = ModernDecoderLM(tiny_config(tie_embeddings=False))
    loaded = ModernDecoderLM.from_pretrained(m.save_pretrained(tmp_path))
    assert torch.equal(loaded.lm_head_weight, m.lm_head_weight)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ModernDecoderLM.from_pretrained(tmp_path / "nope")
    ModernDecoderLM(tiny_config()).save_pretrained(tmp_path)
    cfg_path, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    good_cfg, good_weights = cfg_path.read_text(), weights.read_bytes()

    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        ModernDecoderLM.from_pretrained(tmp_path)
    cfg_path.write_text(json.dumps({**json.loads(good_cfg), "bogus": 1}))
    with pytest.raises(ValueError, match="unknown"):
        ModernDecoderLM.from_pretrained(tmp_path)
    cfg_path.write_text(json.dumps({**json.loads(good_cfg), "d_model": 64}))
    with pytest.raises(ValueError, match="do not match"):
        ModernDecoderLM.from_pretrained(tmp_path)
    cfg_path.write_text(good_cfg)

    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="malformed"):
        ModernDecoderLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        ModernDecoderLM.from_pretrained(tmp_path)
    weights.write_bytes(good_weights)
    cfg_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModernDecoderLM.from_pretrained(tmp_path)


# ------------------------------------------------------------- the seed's training example


def test_seed_complete_training_example_runs() -> None:
    """The seed's "Complete training example", verbatim apart from config and dataloader."""
    from modern_llm.alignment.dpo_loss import dpo_loss

    def compute_sequence_logprobs(
        model: ModernDecoderLM, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        outputs = model(input_ids)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs
        log_probs = F.log_softmax(logits, dim=-1)
        batch_size, seq_len = labels.shape  # noqa: RUF059 (verbatim from the seed)
        token_log_probs = log_probs.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        return token_log_probs.sum(dim=-1)

    config = tiny_config()
    dataloader = [
        {
            "chosen_input_ids": rand_ids(2, 8, seed=s),
            "chosen_labels": rand_ids(2, 8, seed=s + 100),
            "rejected_input_ids": rand_ids(2, 8, seed=s + 200),
            "rejected_labels": rand_ids(2, 8, seed=s + 300),
        }
        for s in range(2)
    ]

    model = ModernDecoderLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    before = model.embed_tokens.weight.detach().clone()
    losses = []
    for batch in dataloader:
        chosen_ids = batch["chosen_input_ids"]
        chosen_labels = batch["chosen_labels"]
        rejected_ids = batch["rejected_input_ids"]
        rejected_labels = batch["rejected_labels"]
        chosen_logprobs = compute_sequence_logprobs(model, chosen_ids, chosen_labels)
        rejected_logprobs = compute_sequence_logprobs(model, rejected_ids, rejected_labels)
        loss = dpo_loss(
            chosen_logprobs=chosen_logprobs,
            rejected_logprobs=rejected_logprobs,
            beta=0.1,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, model.embed_tokens.weight)
