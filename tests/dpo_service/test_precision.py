"""The precision policy (README "Precision"): float32 master weights and AdamW state, compute
in DPO_DTYPE under autocast, float32 reductions, a half-precision frozen reference, float16
loss scaling, and what ``/v1/model`` reports about it.

The issue's table (one step at the default learning rate on the built-in model) was: float32
all parameters updated; float16 ~98% NaN/inf; bfloat16 ~17% updated. The tests here would
have failed on each of those rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import API_KEY, running_server, small_settings
from dpo_service.client import DpoClient, ModelInfo
from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.engine.forward import forward_logps
from dpo_service.engine.precision import make_scaler
from dpo_service.engine.results import LossResult
from dpo_service.models.loader import check_compute_dtype
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens

pytestmark = pytest.mark.timeout(240)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DTYPES = ["float32", "bfloat16", "float16"]
PAIRS = [
    {"prompt": "Q: 2+2? A:", "chosen": " 4, thank you for asking.", "rejected": " five"},
    {"prompt": "Say hi:", "chosen": " Hello there, friend!", "rejected": " no"},
    {"prompt": "Q: 3*3? A:", "chosen": " 9, happy to help.", "rejected": " 10"},
]
STEPS = 6


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


class StepProbe:
    """Wraps the live optimizer's ``step`` to measure each applied update: the fraction of
    parameter elements with a non-zero gradient that the step changed."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.real = self.optimizer.step
        self.fractions: list[float] = []
        self.optimizer.step = self._step  # type: ignore[method-assign]

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        params = self._params()
        before = [p.detach().clone() for p in params]
        nonzero = [p.grad != 0 if p.grad is not None else torch.zeros_like(p, dtype=torch.bool)
                   for p in params]  # fmt: skip
        out = self.real(*args, **kwargs)
        changed = sum(
            int(((p.detach() != b) & nz).sum())
            for p, b, nz in zip(params, before, nonzero, strict=True)
        )
        self.fractions.append(changed / max(1, sum(int(nz.sum()) for nz in nonzero)))
        return out


def _train_run(dtype: str) -> dict[str, Any]:
    """STEPS train steps at the default learning rate through a real server in ``dtype``."""
    with running_server(dtype=dtype, lr=Settings().lr, enable_grpc=False) as server:
        probe = StepProbe(server.core.engine.state.optimizer)
        losses, margins = [], []
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            for step in range(STEPS):
                r = c.post("/dpo/loss", json={"pairs": PAIRS, "train": True}, headers=AUTH)
                assert r.status_code == 200, (dtype, step, r.text)
                body = r.json()
                assert body["trained"] is True and body["new_model_version"] == step + 1
                losses.append(body["loss"])
                margins.append(sum(body["margins"]) / len(body["margins"]))
            after = c.post("/dpo/loss", json={"pairs": PAIRS}).json()  # loss-only works too
            info = c.get("/v1/model").json()
        model = server.core.engine.bundle.model
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"losses": [*losses, after["loss"]], "margins": [*margins, *_mean(after["margins"])],
            "fractions": probe.fractions, "finite": finite, "info": info}  # fmt: skip


def _mean(xs: list[float]) -> list[float]:
    return [sum(xs) / len(xs)]


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    return {dtype: _train_run(dtype) for dtype in DTYPES}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_acknowledged_step_updates_the_model_and_stays_finite(
    runs: dict[str, dict[str, Any]], dtype: str
) -> None:
    """Each of the issue's rows: every acknowledged step changes ≥ 99% of the parameter
    elements whose gradient is non-zero (bf16 weights rounded ~83% of them away), all
    weights stay finite (fp16 weights went ~98% NaN), and the model learns."""
    run = runs[dtype]
    assert len(run["fractions"]) == STEPS
    assert min(run["fractions"]) >= 0.99, run["fractions"]
    assert run["finite"]
    losses, margins = run["losses"], run["margins"]
    assert losses[-1] < losses[0] and margins[-1] > margins[0]
    info = run["info"]
    assert (info["compute_dtype"], info["dtype"], info["param_dtype"]) == (dtype, dtype, "float32")
    assert info["optimizer_state_dtype"] == info["reduction_dtype"] == "float32"
    assert info["autocast"] is (dtype != "float32")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_compute_loss_curve_tracks_float32(
    runs: dict[str, dict[str, Any]], dtype: str
) -> None:
    """Same model, data and seed, default learning rate: every loss of the half-compute run
    (the losses before each step, then after the last) is within 10% of how far float32's
    loss moved over the run. Measured: 1.1% (bf16) and 0.2% (fp16) of it: the log-probs
    differ by ~1e-3 nats per token (see below) and AdamW's normalised update barely feels
    small gradient errors. A run whose updates were rounded away (the issue's bf16 row:
    ~17% of the elements updated, so the loss moves ~1/5 as far) would be ~80% off, and a
    NaN run fails outright."""
    ref, got = runs["float32"]["losses"], runs[dtype]["losses"]
    moved = ref[0] - ref[-1]
    assert moved > 0
    worst = max(abs(a - b) for a, b in zip(ref, got, strict=True))
    assert worst <= 0.10 * moved, (worst, moved)


def _pairs(bundle: Any) -> list[PairTokens]:
    """Arithmetic answers plus random letter strings, responses of 1 to ~120 tokens."""
    rng = random.Random(1)

    def words(alphabet: str, lo: int, hi: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(lo, hi)))

    text = [(f"Question {i}: what is {i}*{i + 3}? ", f" It is {i * (i + 3)}, gladly." * (1 + i % 3),
             f" No idea {i}.") for i in range(6)]  # fmt: skip
    text += [(words("abcdefgh ", 5, 80), words("abcdefgh ", 1, 120), words("xyz ", 1, 60))
             for _ in range(10)]  # fmt: skip
    return [bundle.tokenizer.encode_triple(*t) for t in text]


#: Unit roundoff (half the spacing at 1.0) of the half dtypes.
ROUNDOFF = {"bfloat16": 2.0**-9, "float16": 2.0**-11}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_log_prob_error_of_half_compute_is_bounded(dtype: str) -> None:
    """Log-probs of the same float32 weights computed in ``dtype`` vs float32, on the
    default built-in model (d 256, 4 layers), 32 responses of 1 to ~120 tokens.

    Bound, from the dtype's unit roundoff u (bf16 2^-9, fp16 2^-11): a token's log-prob is a
    logit minus a float32 log-sum-exp of logits that carry a few roundings of O(1) values, so
    its error is a few u: at most 4u per response token, and at most u relative to the
    sequence's sum (the token errors do not all share a sign). Measured on CPU: bf16
    1.8e-3 nats per token (0.9u), 3.6e-4 relative (0.2u); fp16 2.0e-4 per token (0.4u),
    3.9e-5 relative (0.08u). A half-precision reduction breaks both: summing ~100 log-probs
    of ~-5.6 in bf16 (spacing 4 at 600) is off by several nats, ~0.05 per token."""
    per_token, relative = _log_prob_errors(torch.device("cpu"), dtype)
    print(f"\n{dtype} vs float32 log-probs: max {per_token:.2e} nats per response token, "
          f"max {relative:.2e} relative to the sequence log-prob")  # fmt: skip
    assert per_token <= 4 * ROUNDOFF[dtype]
    assert relative <= ROUNDOFF[dtype]


def _log_prob_errors(device: torch.device, dtype: str) -> tuple[float, float]:
    """Max error of ``dtype`` log-probs vs float32: per response token, and relative."""
    engine = make_engine(Settings(device=str(device), dtype="float32"))
    engine.load()
    state = engine.state
    assert state is not None
    pairs = _pairs(state.bundle)
    model = state.bundle.causal_lm
    with torch.inference_mode():
        exact = forward_logps(model, pairs, Settings(dtype="float32"), state.bundle)
        half = forward_logps(model, pairs, Settings(dtype=dtype), state.bundle)
    assert half.chosen.dtype == torch.float32
    tokens = torch.cat((exact.chosen_tokens, exact.rejected_tokens)).double()
    sums = torch.cat((exact.chosen, exact.rejected)).double()
    diff = (torch.cat((half.chosen, half.rejected)).double() - sums).abs()
    return float((diff / tokens).max()), float((diff / sums.abs()).max())


def test_frozen_reference_in_half_equals_the_policy_at_version_zero() -> None:
    """The reference stores its linear layers in bf16 (autocast casts them to bf16 anyway):
    it computes exactly the policy's log-probs at version 0, in less memory."""
    engine = make_engine(small_settings(dtype="bfloat16", keep_reference=True))
    engine.load()
    state = engine.state
    assert state is not None and state.reference is not None
    ref_model = state.reference
    q_proj = ref_model.layers[0].attn.q_proj  # type: ignore[attr-defined]
    assert q_proj.weight.dtype == torch.bfloat16
    assert ref_model.embed_tokens.weight.dtype == torch.float32  # type: ignore[attr-defined]
    assert {p.dtype for p in state.bundle.model.parameters()} == {torch.float32}
    pairs = _pairs(state.bundle)
    with torch.inference_mode():
        policy = forward_logps(state.bundle.causal_lm, pairs, engine.settings, state.bundle)
        reference = forward_logps(ref_model, pairs, engine.settings, state.bundle)
    assert torch.equal(policy.chosen, reference.chosen)
    assert torch.equal(policy.rejected, reference.rejected)
    memory = engine.info().memory
    assert set(memory.reference_bytes) == {"bfloat16", "float32"}
    assert sum(memory.reference_bytes.values()) < sum(memory.weights_bytes.values())


def test_model_info_reports_policy_and_memory_on_both_protocols() -> None:
    with running_server(dtype="bfloat16", keep_reference=True) as server:
        model = server.core.engine.bundle.model
        params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        with (
            DpoClient.http(server.http_url, api_key=API_KEY) as h,
            DpoClient.grpc(server.grpc_target, api_key=API_KEY) as g,
        ):
            before = h.model_info()
            assert before == g.model_info()
            h.compute_loss([("Q: 2+2?", " 4", " 5")], train=True)
            after = g.model_info()
            assert after == h.model_info()
    assert (before.compute_dtype, before.param_dtype, before.reference_dtype) == (
        "bfloat16", "float32", "bfloat16")  # fmt: skip
    assert before.autocast is True and before.loss_scale is None
    assert before.step_rollback == "verify"
    mem = before.memory
    assert mem is not None and after.memory is not None
    assert mem.weights_bytes == {"float32": 4 * params + buffers}
    assert mem.master_copy_bytes == 0 and mem.rollback_snapshot_bytes == 0
    assert mem.optimizer_state_bytes == {}  # AdamW allocates at its first step
    assert mem.gradient_bytes == 4 * params
    assert mem.optimizer_state_bytes_after_step == 8 * params + 4 * len(list(model.parameters()))
    assert after.memory.optimizer_state_bytes == {"float32": mem.optimizer_state_bytes_after_step}
    assert after.memory.total_bytes == (
        4 * params + buffers + mem.optimizer_state_bytes_after_step
        + sum(mem.reference_bytes.values())
    )  # fmt: skip


def test_client_reads_model_info_of_a_server_without_the_precision_fields() -> None:
    old = {"name": "m", "kind": "builtin", "parameters": 1, "vocab_size": 259,
           "max_seq_len": 8, "dtype": "bfloat16", "device": "cpu", "model_version": 0,
           "tokenizer": "t", "reference": False}  # fmt: skip
    info = ModelInfo.from_dict(old)
    assert info.dtype == "bfloat16" and info.compute_dtype is None and info.memory is None
    with pytest.raises(KeyError):
        ModelInfo.from_dict({k: v for k, v in old.items() if k != "dtype"})


def test_float16_overflow_is_a_skipped_step_with_its_reason() -> None:
    """Dynamic loss scaling: a step whose scaled float16 gradients overflow is answered 422
    with the reason, applies nothing, is counted, halves the scale; the retry applies."""
    with running_server(dtype="float16", enable_grpc=False) as server:
        state = server.core.engine.state
        body = {"pairs": PAIRS, "train": True, "request_id": "fp16-1"}
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            assert c.get("/v1/model").json()["loss_scale"] == 2.0**16
            rejected = _metric(c, "dpo_rejected_steps_total")
            weights = {k: v.clone() for k, v in state.bundle.model.state_dict().items()}
            state.scaler = make_scaler(torch.device("cpu"), torch.float16, init_scale=2.0**40)
            r = c.post("/dpo/loss", json=body, headers=AUTH)
            assert r.status_code == 422, r.text
            detail = r.json()["detail"]
            assert "overflowed at loss scale 1.09951e+12" in detail and "retry" in detail
            assert _metric(c, "dpo_rejected_steps_total") == rejected + 1
            assert server.version == 0
            model_weights = state.bundle.model.state_dict()
            assert all(torch.equal(v, model_weights[k]) for k, v in weights.items())
            assert c.get("/v1/model").json()["loss_scale"] == 2.0**39
            state.scaler = make_scaler(torch.device("cpu"), torch.float16)
            ok = c.post("/dpo/loss", json=body, headers=AUTH)
            assert ok.status_code == 200 and ok.json()["new_model_version"] == 1
            loss_only = c.post("/dpo/loss", json={"pairs": PAIRS})
            assert loss_only.status_code == 200, loss_only.text


def test_a_compute_dtype_the_device_cannot_run_is_refused() -> None:
    with pytest.raises(ValueError, match="float64 is not supported"):
        check_compute_dtype(torch.device("cpu"), torch.float64)
    check_compute_dtype(torch.device("cpu"), torch.bfloat16)  # CPU autocast has both halves
    check_compute_dtype(torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        Settings(dtype="float64")


def _ckpt_engine(tmp_path: Path, **overrides: Any) -> Engine:
    engine = make_engine(small_settings(enable_grpc=False, checkpoint_dir=tmp_path, **overrides))
    engine.load()
    return engine


def _step(engine: Engine) -> None:
    assert isinstance(engine._train_one(_prepared(engine)()), LossResult)


def test_bf16_compute_checkpoints_and_resumes_float32_master_weights(tmp_path: Path) -> None:
    a = _ckpt_engine(tmp_path, dtype="bfloat16")
    for _ in range(2):
        _step(a)
    path = a._checkpoint_now().path
    asyncio.run(a.stop())
    assert json.loads((path / "state.json").read_text())["extra"]["dtype"] == "torch.float32"
    b = _ckpt_engine(tmp_path, dtype="bfloat16")
    assert a.bundle is not None and b.bundle is not None and b.version == 2
    live = b.bundle.model.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, live[k])
               for k, v in a.bundle.model.state_dict().items())  # fmt: skip
    _step(a)
    _step(b)  # both continue identically
    after = b.bundle.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in a.bundle.model.state_dict().items())
    asyncio.run(b.stop())


def test_a_checkpoint_of_half_weights_is_cast_up_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint written before this policy holds bf16 weights and moments; it resumes
    as float32 master weights (the values are exact: bf16 ⊂ float32) and says so."""
    old = _ckpt_engine(tmp_path)
    _step(old)
    assert old.bundle is not None and old.state is not None
    old.bundle.model.to(torch.bfloat16)  # what the old loader held for DPO_DTYPE=bfloat16
    for entries in old.state.optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            entries[key] = entries[key].to(torch.bfloat16)
    old._checkpoint_now()
    asyncio.run(old.stop())
    with caplog.at_level(logging.WARNING):
        new = _ckpt_engine(tmp_path, dtype="bfloat16")
    assert "holds torch.bfloat16 weights; casting to the loaded model's torch.float32" in (
        caplog.text
    )
    assert new.bundle is not None and new.state is not None and new.version == 1
    live = new.bundle.model.state_dict()
    for k, v in old.bundle.model.state_dict().items():
        assert live[k].dtype == torch.float32 and torch.equal(live[k], v.float()), k
    moments = [t for e in new.state.optimizer.state.values() for t in e.values() if t.dim()]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    _step(new)
    assert all(bool(torch.isfinite(p).all()) for p in new.bundle.model.parameters())
    asyncio.run(new.stop())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_hf_model_loads_float32_and_trains_in_half_compute(tmp_path: Path, dtype: str) -> None:
    """A transformers model through the service: float32 master weights whatever DPO_DTYPE,
    a half reference equal to the policy at version 0, a finite applied step."""
    hf = pytest.importorskip("test_hf_model")  # skips without transformers
    hf._save_tiny_llama(tmp_path / "m")
    with running_server(model=f"hf:{tmp_path / 'm'}", dtype=dtype, keep_reference=True,
                        enable_grpc=False) as server:  # fmt: skip
        engine = server.core.engine
        assert {p.dtype for p in engine.bundle.model.parameters()} == {torch.float32}
        pairs = [{"prompt": "the cat", "chosen": " sat", "rejected": " ran"}]
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            body = {"pairs": pairs, "reference": "frozen"}
            first = c.post("/dpo/loss", json=body).json()
            assert first["chosen_logps"] == first["reference_chosen_logps"]
            r = c.post("/dpo/loss", json={**body, "train": True}, headers=AUTH)
            assert r.status_code == 200 and r.json()["trained"] is True, r.text
            info = c.get("/v1/model").json()
        assert (info["compute_dtype"], info["reference_dtype"]) == (dtype, dtype)
        assert all(bool(torch.isfinite(p).all()) for p in engine.bundle.model.parameters())


# ------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.cuda
@cuda
def test_cuda_log_prob_error_of_bf16_is_bounded() -> None:
    per_token, relative = _log_prob_errors(torch.device("cuda"), "bfloat16")
    print(f"\ncuda bfloat16 vs float32 log-probs: max {per_token:.2e} nats per response "
          f"token, {relative:.2e} relative")  # fmt: skip
    assert per_token <= 4 * ROUNDOFF["bfloat16"] and relative <= ROUNDOFF["bfloat16"]


@pytest.mark.cuda
@cuda
def test_cuda_bf16_train_steps_apply_and_stay_finite() -> None:
    """The engine on CUDA in bf16 autocast: every step applied, ≥ 99% of the elements with a
    gradient updated, weights finite, loss down."""
    engine = make_engine(small_settings(device="cuda", dtype="bfloat16", lr=1e-5))
    engine.load()
    state = engine.state
    assert state is not None and engine.bundle is not None
    request, probe = _prepared(engine), StepProbe(state.optimizer)
    losses = []
    for _ in range(STEPS):
        result = engine._train_one(request())
        assert not isinstance(result, BaseException), result
        losses.append(result.loss)
    assert min(probe.fractions) >= 0.99 and len(probe.fractions) == STEPS
    assert all(bool(torch.isfinite(p).all()) for p in state.bundle.model.parameters())
    assert losses[-1] < losses[0]


def _prepared(engine: Any) -> Callable[[], Any]:
    from dpo_service.engine.preparation import prepare
    from dpo_service.schemas import LossRequest

    def make() -> Any:
        body = LossRequest.model_validate({"pairs": PAIRS, "train": True})
        return prepare(body, engine.bundle.tokenizer, engine.limits())

    return make
