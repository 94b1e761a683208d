"""``hf:`` models: a tiny random Llama and a word-level tokenizer saved locally (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("transformers")

from conftest import API_KEY, running_server
from dpo_service.engine.forward import strategy_for
from dpo_service.models.bundle import ModelBundle
from dpo_service.models.hf import (
    HFCausalLM,
    HFTripleTokenizer,
    check_lm_head,
    load_hf_bundle,
    probe_custom_mask,
)
from dpo_service.models.loader import builtin_config, load_bundle
from dpo_service.settings import Settings
from modern_llm.alignment.dpo_loss import dpo_loss
from modern_llm.alignment.logprobs import LogpStrategy, PairTokens, pair_logps

WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", ".", "dog", "ran", "far", "away", "hello"),
    *("world", "what", "is", "two", "plus", "four", "five", "probably", "say", "hi", "no"),
    *("yes", "good", "bad", "answer", "question"),
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2

TEXT_PAIRS = [
    {"prompt": "what is two plus two", "chosen": "four", "rejected": "five probably"},
    {"prompt": "say hi", "chosen": "hello world", "rejected": "no"},
    {"prompt": "question : the cat", "chosen": "sat on a mat .", "rejected": "ran far away"},
]


def _tokenizer(with_pad: bool = True) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )


def _save_tiny_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        initializer_range=0.2,  # larger than default so tokens really influence each other
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    _save_tiny_llama(out)
    return out


@pytest.fixture(scope="module")
def bundle(model_dir: Path) -> ModelBundle:
    return _load(model_dir)


@pytest.fixture(scope="module")
def stock_model(model_dir: Path) -> Any:
    """The same checkpoint as transformers loads it, untouched by the adapter (the reference)."""
    return _stock_model(model_dir)


def _stock_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _load(path: Path | str) -> ModelBundle:
    return load_bundle(
        f"hf:{path}",
        device=torch.device("cpu"),
        dtype=torch.float32,
        builtin=builtin_config(d_model=32, layers=1, heads=2, kv_heads=1, max_seq_len=64, seed=0),
    )


def _reference_logps(model: Any, pair: PairTokens) -> tuple[float, float]:
    """transformers' own forward, one sequence at a time: full logits → log_softmax → gather."""
    out = []
    for response in (pair.chosen, pair.rejected):
        ids = torch.tensor([pair.prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
        targets = ids[0, 1:]
        token = logp.gather(1, targets[:, None]).squeeze(1)
        out.append(float(token[len(pair.prompt) - 1 :].sum()))
    return out[0], out[1]


def _encode(bundle: ModelBundle) -> list[PairTokens]:
    return [bundle.tokenizer.encode_triple(**p) for p in TEXT_PAIRS]


# ------------------------------------------------------------------------------ loading


def test_bundle_metadata(bundle: ModelBundle, model_dir: Path) -> None:
    assert isinstance(bundle.model, HFCausalLM)
    assert bundle.kind == "hf" and bundle.name == model_dir.name
    assert bundle.vocab_size == len(SPECIALS) + len(WORDS)
    assert bundle.max_seq_len == 128
    assert bundle.supports_custom_mask is True  # the 4D mask probe passed for Llama
    assert bundle.model.supports_prefix_cache is True  # and the prefix KV cache probe
    tok = bundle.tokenizer
    assert tok.vocab_size == bundle.vocab_size and tok.pad_id == PAD
    assert tok.name.endswith(f":{model_dir.name}")
    assert next(bundle.model.parameters()).dtype == torch.float32
    assert all(not m.training for m in bundle.model.modules())


def test_loads_in_bfloat16(model_dir: Path) -> None:
    b = load_hf_bundle(model_dir, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16}
    rope = b.model.model.model.rotary_emb.inv_freq  # type: ignore[union-attr]
    assert rope.dtype == torch.float32  # buffers transformers keeps in fp32 stay fp32
    logps = pair_logps(b.causal_lm, _encode(b), pad_id=b.tokenizer.pad_id)
    assert torch.isfinite(logps.chosen).all() and torch.isfinite(logps.rejected).all()


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        _load(missing)
    assert str(missing) in str(err.value)


def test_malformed_config_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match="could not be loaded") as err:
        _load(bad)
    assert str(bad) in str(err.value)


def test_directory_without_safetensors_is_refused(model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        _load(bare)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        _load(tmp_path / "empty")


def test_logit_transforming_architectures_are_refused(bundle: ModelBundle) -> None:
    adapter = bundle.model
    assert isinstance(adapter, HFCausalLM)
    config: Any = adapter.model.config
    config.logit_scale = 0.5
    try:
        with pytest.raises(ValueError, match="logit_scale"):
            check_lm_head(adapter)
    finally:
        del config.logit_scale
    check_lm_head(adapter)


# ------------------------------------------------------------------------------ tokenization


def test_tokenization_layout(bundle: ModelBundle) -> None:
    tok = bundle.tokenizer
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    pair = tok.encode_triple("say hi", "hello world", "no")
    assert pair.prompt == [BOS, vocab["say"], vocab["hi"]]  # BOS once, no EOS
    assert pair.chosen == [vocab["hello"], vocab["world"], EOS]  # no BOS, EOS appended
    assert pair.rejected == [vocab["no"], EOS]
    # a prompt whose text already starts with BOS still gets it once
    assert tok.encode_triple("<s> say hi", "no", "yes").prompt == pair.prompt
    assert tok.encode_triple("say", "", "yes").chosen == []  # empty stays empty (→ 422)


def test_pad_falls_back_to_eos() -> None:
    tok = HFTripleTokenizer(_tokenizer(with_pad=False))
    assert tok.pad_id == EOS


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize(
    "strategy", [LogpStrategy.TWO_ROWS, LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE]
)
def test_logps_equal_transformers_forward(
    bundle: ModelBundle, stock_model: Any, strategy: LogpStrategy
) -> None:
    pairs = _encode(bundle)
    with torch.no_grad():
        got = pair_logps(bundle.causal_lm, pairs, strategy=strategy, pad_id=bundle.tokenizer.pad_id)
    for i, pair in enumerate(pairs):
        chosen, rejected = _reference_logps(stock_model, pair)
        assert float(got.chosen[i]) == pytest.approx(chosen, abs=1e-5)
        assert float(got.rejected[i]) == pytest.approx(rejected, abs=1e-5)
    assert got.chosen_tokens.tolist() == [len(p.chosen) for p in pairs]


@pytest.mark.parametrize("strategy", [LogpStrategy.SHARED_PREFIX, LogpStrategy.PREFIX_CACHE])
def test_layout_gradients_match_two_rows(model_dir: Path, strategy: LogpStrategy) -> None:
    b = _load(model_dir)
    pairs = _encode(b)
    grads = []
    for layout in (LogpStrategy.TWO_ROWS, strategy):
        b.model.zero_grad(set_to_none=True)
        logps = pair_logps(b.causal_lm, pairs, strategy=layout, pad_id=b.tokenizer.pad_id)
        dpo_loss(logps.chosen, logps.rejected, beta=0.5).backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.model.parameters()]))  # type: ignore[union-attr]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_probe_falls_back_to_two_rows_when_the_mask_is_ignored(
    bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = bundle.model
    assert isinstance(adapter, HFCausalLM)
    monkeypatch.setattr(HFCausalLM, "_mask_4d", lambda self, allowed, dtype: None)
    assert probe_custom_mask(adapter) is None
    assert adapter.mask_style == "additive"  # left as it was
    settings = Settings(logp_strategy="shared_prefix")
    degraded = ModelBundle(**{**bundle.__dict__, "supports_custom_mask": False})
    assert strategy_for(settings, degraded) is LogpStrategy.TWO_ROWS
    assert strategy_for(settings, bundle) is LogpStrategy.SHARED_PREFIX


# ------------------------------------------------------------------------------ service


def test_train_step_through_the_service(model_dir: Path) -> None:
    """One keyed train request changes the HF weights; the next loss reflects the step, and the
    frozen reference copy still holds the initial weights."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with running_server(model=f"hf:{model_dir}", enable_grpc=False, keep_reference=True) as srv:
        engine = srv.core.engine
        with httpx.Client(base_url=srv.http_url, timeout=120) as c:
            info = c.get("/v1/model").json()
            assert info["kind"] == "hf" and info["name"] == model_dir.name
            body = {"pairs": TEXT_PAIRS, "beta": 0.5}
            before = c.post("/dpo/loss", json=body).json()
            weights = [p.detach().clone() for p in engine.bundle.model.parameters()]
            trained = c.post("/dpo/loss", json={**body, "train": True}, headers=auth)
            assert trained.status_code == 200, trained.text
            after = c.post("/dpo/loss", json=body).json()
            frozen = c.post("/dpo/loss", json={**body, "reference": "frozen"}).json()
    t = trained.json()
    assert t["trained"] is True and t["new_model_version"] == before["model_version"] + 1
    assert t["loss"] == pytest.approx(before["loss"], abs=1e-5)  # computed before the step
    changed = [
        not torch.equal(w, p.detach())
        for w, p in zip(weights, engine.bundle.model.parameters(), strict=True)
    ]
    assert any(changed)
    assert after["model_version"] == t["new_model_version"]
    assert after["loss"] != pytest.approx(before["loss"], abs=1e-6)
    assert after["loss"] < before["loss"]  # one step down the DPO gradient on the same pairs
    pairs = _encode(engine.bundle)
    assert after["chosen_tokens"] == [len(p.chosen) for p in pairs]
    # the frozen copy was taken at load: its log-probs are the policy's from before the step
    assert frozen["reference_chosen_logps"] == pytest.approx(before["chosen_logps"], abs=1e-5)
    assert frozen["chosen_logps"] == pytest.approx(after["chosen_logps"], abs=1e-5)
