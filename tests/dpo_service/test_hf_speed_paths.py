"""The ``hf:`` speed paths stay exact: the prefix KV cache (``PREFIX_CACHE``, the loss-only
``auto`` layout) and its load-time probe, the fused RMSNorms, the autocast mask dtype. Every
reference is transformers' own forward of the untouched checkpoint. No timing assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch

pytest.importorskip("transformers")

from conftest import running_server
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.engine.forward import strategy_for
from dpo_service.engine.train_state import frozen_copy
from dpo_service.models import hf_speed
from dpo_service.models.bundle import ModelBundle
from dpo_service.models.hf import HFCausalLM, probe_prefix_cache
from dpo_service.models.hf_speed import FusedRMSNorm, fuse_rms_norms
from dpo_service.settings import Settings
from modern_llm.alignment.dpo_loss import dpo_loss
from modern_llm.alignment.logprobs import LogpStrategy, PairTokens, pair_logps, resolve_strategy
from test_hf_model import (
    TEXT_PAIRS,
    _encode,
    _load,
    _reference_logps,
    _save_tiny_llama,
    _stock_model,
)

ROOT = Path(__file__).resolve().parents[2]
# Prompts of 1..6 tokens and responses of 1..4 (padding in both passes of PREFIX_CACHE).
ID_PAIRS = [
    PairTokens([1, 5, 6, 7, 8, 9], [10, 2], [11, 12, 13, 2]),
    PairTokens([1], [14], [15, 16]),
    PairTokens([1, 17, 18], [19, 20, 21, 2], [2]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama-speed")
    _save_tiny_llama(out)
    return out


@pytest.fixture(scope="module")
def stock(model_dir: Path) -> Any:
    return _stock_model(model_dir)


@pytest.fixture()
def bundle(model_dir: Path) -> ModelBundle:
    return _load(model_dir)  # fresh per test: some tests train it or switch paths off


def _adapter(bundle: ModelBundle) -> HFCausalLM:
    assert isinstance(bundle.model, HFCausalLM)
    return bundle.model


def _logps(bundle: ModelBundle, pairs: list[PairTokens], strategy: LogpStrategy) -> Any:
    return pair_logps(bundle.causal_lm, pairs, strategy=strategy, pad_id=bundle.tokenizer.pad_id)


def _assert_equal_reference(stock: Any, pairs: list[PairTokens], got: Any) -> None:
    for i, pair in enumerate(pairs):
        chosen, rejected = _reference_logps(stock, pair)
        assert float(got.chosen[i]) == pytest.approx(chosen, abs=1e-5)
        assert float(got.rejected[i]) == pytest.approx(rejected, abs=1e-5)


# ------------------------------------------------------------------------------ layout choice


def test_llama_gets_the_prefix_cache_for_loss_only_and_shared_prefix_for_training(
    bundle: ModelBundle,
) -> None:
    adapter = _adapter(bundle)
    assert bundle.supports_custom_mask is True and adapter.supports_prefix_cache is True
    auto = strategy_for(Settings(), bundle)
    assert resolve_strategy(adapter, auto, grad=False) is LogpStrategy.PREFIX_CACHE
    assert resolve_strategy(adapter, auto, grad=True) is LogpStrategy.SHARED_PREFIX
    explicit = strategy_for(Settings(logp_strategy="shared_prefix"), bundle)
    assert resolve_strategy(adapter, explicit, grad=False) is LogpStrategy.SHARED_PREFIX


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("pairs_of", ["text", "ids"])
def test_prefix_cache_logps_equal_the_float64_reference(
    bundle: ModelBundle, stock: Any, pairs_of: str
) -> None:
    pairs = _encode(bundle) if pairs_of == "text" else ID_PAIRS
    with torch.inference_mode():
        got = _logps(bundle, pairs, LogpStrategy.PREFIX_CACHE)
        auto = _logps(bundle, pairs, LogpStrategy.AUTO)  # resolves to PREFIX_CACHE here
    _assert_equal_reference(stock, pairs, got)
    assert torch.equal(auto.chosen, got.chosen) and torch.equal(auto.rejected, got.rejected)
    assert got.rejected_tokens.tolist() == [len(p.rejected) for p in pairs]


@pytest.mark.parametrize("strategy", [LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE])
def test_gradients_of_every_layout_equal_two_rows(
    bundle: ModelBundle, strategy: LogpStrategy
) -> None:
    grads = []
    for s in (LogpStrategy.TWO_ROWS, strategy):
        bundle.model.zero_grad(set_to_none=True)
        logps = _logps(bundle, ID_PAIRS, s)
        dpo_loss(logps.chosen, logps.rejected, beta=0.5).backward()
        grads.append(torch.cat([p.grad.flatten() for p in bundle.model.parameters()]))  # type: ignore[union-attr]
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_frozen_reference_copy_keeps_the_speed_paths(bundle: ModelBundle, stock: Any) -> None:
    ref = frozen_copy(bundle.model)
    assert isinstance(ref, HFCausalLM) and ref.supports_prefix_cache is True
    norms = [m for m in ref.modules() if isinstance(m, FusedRMSNorm)]
    assert norms and all(not m.weight.requires_grad for m in norms)  # frozen too
    with torch.inference_mode():
        got = pair_logps(ref, ID_PAIRS, pad_id=bundle.tokenizer.pad_id)
    _assert_equal_reference(stock, ID_PAIRS, got)


# ------------------------------------------------------------------------------ the cache contract


def test_hidden_states_return_and_tile_a_kv_cache(bundle: ModelBundle) -> None:
    adapter = _adapter(bundle)
    config: Any = adapter.model.config
    prompts = torch.tensor([[1, 5, 6], [1, 7, 8]])
    with torch.inference_mode():
        hidden, cache = adapter.hidden_states(prompts, use_cache=True)
        assert hidden.shape == (2, 3, config.hidden_size)
        assert len(cache) == config.num_hidden_layers
        head_dim = config.hidden_size // config.num_attention_heads
        assert all(k.shape == v.shape == (2, 2, 3, head_dim) for k, v in cache)
        # 4 rows on a cache of 2: row i continues prompt i % 2 (positions 3, 4)
        tail = torch.tensor([[9, 10], [11, 12], [13, 14], [15, 16]])
        cached = adapter.hidden_states(
            tail, position_ids=torch.tensor([[3, 4]] * 4), past_key_values=cache
        )
        whole = adapter.hidden_states(torch.cat([prompts.repeat(2, 1), tail], dim=1))
    torch.testing.assert_close(cached, whole[:, 3:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="must divide"):
        adapter.hidden_states(tail[:3], past_key_values=cache)


def test_kv_caches_are_refused_where_the_probe_did_not_pass(
    bundle: ModelBundle, stock: Any
) -> None:
    adapter = _adapter(bundle)
    adapter.supports_prefix_cache = False
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(NotImplementedError, match="KV caches"):
        adapter.hidden_states(ids, use_cache=True)
    with torch.inference_mode():
        got = pair_logps(adapter, ID_PAIRS, pad_id=bundle.tokenizer.pad_id)  # auto → shared
    assert resolve_strategy(adapter, LogpStrategy.AUTO, grad=False) is LogpStrategy.SHARED_PREFIX
    _assert_equal_reference(stock, ID_PAIRS, got)


# ------------------------------------------------------------------------------ the probe


def _interleaved(past: Any, batch: int) -> Any:
    """A wrong tiling: row i continues cache row i // 2 instead of i mod B'."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(past):
        reps = batch // k.shape[0]
        cache.update(k.repeat_interleave(reps, 0), v.repeat_interleave(reps, 0), i)
    return cache


@pytest.mark.parametrize(
    "fault",
    [
        "cache tiled wrongly",
        "cache ignored",
        "mask ignored with a cache",
    ],
)
def test_probe_turns_the_prefix_cache_off_when_it_is_not_exact(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    adapter = _adapter(bundle)
    assert probe_prefix_cache(adapter) is True
    if fault == "cache tiled wrongly":
        monkeypatch.setattr(hf_speed, "tiled_cache", _interleaved)
    elif fault == "cache ignored":
        monkeypatch.setattr(hf_speed, "tiled_cache", lambda past, batch: None)
    else:
        original = HFCausalLM._mask_4d

        def drop_with_past(self: HFCausalLM, allowed: torch.Tensor, dtype: torch.dtype) -> Any:
            mask = original(self, allowed, dtype)
            return None if allowed.shape[-1] != allowed.shape[-2] else mask  # keys ≠ queries

        monkeypatch.setattr(HFCausalLM, "_mask_4d", drop_with_past)
    assert probe_prefix_cache(adapter) is False
    assert adapter.supports_prefix_cache is False
    assert resolve_strategy(adapter, LogpStrategy.AUTO, grad=False) is LogpStrategy.SHARED_PREFIX


# ------------------------------------------------------------------------------ fused norms


def test_llama_norms_are_fused_with_the_same_parameters(
    bundle: ModelBundle, stock: Any, model_dir: Path
) -> None:
    adapter = _adapter(bundle)
    config: Any = adapter.model.config
    norms = [m for m in adapter.modules() if isinstance(m, FusedRMSNorm)]
    assert len(norms) == len(adapter.stock_modules) == 2 * config.num_hidden_layers + 1
    # same parameter names (checkpoints, identity) and the very Parameters the optimizer holds
    assert list(adapter.model.state_dict()) == list(stock.state_dict())
    params = {id(p) for p in adapter.parameters()}
    assert all(id(m.weight) in params for m in norms)
    assert bundle.identity == _load(model_dir).identity


def test_fused_norms_train_exactly_like_the_stock_modules(model_dir: Path) -> None:
    """Gradients (and log-probs) with the fused norms equal those of transformers' modules."""
    fused, plain = _load(model_dir), _load(model_dir)
    _adapter(plain).use_stock_paths()
    assert not any(isinstance(m, FusedRMSNorm) for m in plain.model.modules())
    assert _adapter(plain).supports_prefix_cache is False
    grads, sums = [], []
    for b in (fused, plain):
        logps = _logps(b, ID_PAIRS, LogpStrategy.SHARED_PREFIX)
        dpo_loss(logps.chosen, logps.rejected, beta=0.5).backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.model.parameters()]))  # type: ignore[union-attr]
        sums.append(torch.cat([logps.chosen, logps.rejected]).detach())
    torch.testing.assert_close(sums[0], sums[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


class _ShiftedRMSNorm(torch.nn.Module):
    """Looks like a Llama RMSNorm but scales by (1 + weight), as Gemma's does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (1.0 + self.weight) * h.to(x.dtype)


def test_a_norm_that_only_looks_alike_is_not_replaced() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    body = torch.nn.Sequential(_ShiftedRMSNorm(8), LlamaRMSNorm(8, eps=1e-5))
    replaced = fuse_rms_norms(body)
    assert list(replaced) == ["1"]
    assert isinstance(body[0], _ShiftedRMSNorm) and isinstance(body[1], FusedRMSNorm)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(body[1](x), replaced["1"](x))
    hf_speed.restore_modules(body, replaced)
    assert isinstance(body[1], LlamaRMSNorm)


# ------------------------------------------------------------------------------ precision


def test_the_additive_mask_is_built_in_the_autocast_dtype(bundle: ModelBundle) -> None:
    adapter = _adapter(bundle)
    cpu = torch.device("cpu")
    assert adapter._mask_dtype(cpu) == torch.float32
    with torch.inference_mode():
        full = _logps(bundle, ID_PAIRS, LogpStrategy.TWO_ROWS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert adapter._mask_dtype(cpu) == torch.bfloat16
            halves = [
                _logps(bundle, ID_PAIRS, s) for s in LogpStrategy if s is not LogpStrategy.AUTO
            ]
    for got in halves:  # bf16 compute: close to float32, never NaN from the mask
        assert torch.isfinite(got.chosen).all() and torch.isfinite(got.rejected).all()
        torch.testing.assert_close(got.chosen, full.chosen, atol=0.3, rtol=5e-2)
        torch.testing.assert_close(got.rejected, full.rejected, atol=0.3, rtol=5e-2)


# ------------------------------------------------------------------------------ the service


def test_loss_only_through_both_protocols_equals_the_float64_reference(
    model_dir: Path, stock: Any
) -> None:
    """A loss-only request runs the prefix cache in the engine (HTTP and gRPC)."""
    with running_server(model=f"hf:{model_dir}") as srv:
        assert srv.core.engine.bundle.model.supports_prefix_cache is True
        with httpx.Client(base_url=srv.http_url, timeout=120) as c:
            rest = c.post("/dpo/loss", json={"pairs": TEXT_PAIRS, "beta": 0.5})
        assert rest.status_code == 200, rest.text
        triples = [pb.TextTriple(**p) for p in TEXT_PAIRS]
        with grpc.insecure_channel(srv.grpc_target) as ch:
            req = pb.ComputeLossRequest(pairs=[pb.PreferencePair(text=t) for t in triples])
            rpc = pb_grpc.DpoServiceStub(ch).ComputeLoss(req, timeout=60)
        pairs = _encode(srv.core.engine.bundle)
    body = rest.json()
    for i, pair in enumerate(pairs):
        chosen, rejected = _reference_logps(stock, pair)
        assert body["chosen_logps"][i] == pytest.approx(chosen, abs=1e-4)
        assert body["rejected_logps"][i] == pytest.approx(rejected, abs=1e-4)
        assert rpc.chosen_logps[i] == pytest.approx(chosen, abs=1e-4)
        assert rpc.rejected_logps[i] == pytest.approx(rejected, abs=1e-4)


# ------------------------------------------------------------------------------ the benchmark


@pytest.mark.slow
def test_hf_bench_smoke_reports_layouts_and_equal_weights() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hf.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| trl |")]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert [c[1] for c in cells] == [
        "loss-only",
        "loss-only, hf previous default",
        "train step",
        "train step, hf previous default",
    ]
    assert [c[2] for c in cells] == [
        "prefix_cache / prefix_cache",
        "prefix_cache / shared_prefix",  # the stock paths: no prefix KV cache
        "shared_prefix / shared_prefix",
        "shared_prefix / shared_prefix",
    ]
    assert all(float(c[3]) > 0 and float(c[4]) > 0 for c in cells)
    assert "weights shared: True; fused norms 5;" in done.stderr  # 2 layers × 2 + final
    diff = float(done.stdout.split("largest log-prob difference ")[1].split(")")[0])
    assert diff < 1e-3  # the HF twin computes the built-in model's function
