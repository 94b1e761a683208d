"""Checkpoints of Hugging Face models (issue 10, item 5): the identity a checkpoint records
(architecture, sizes, vocabulary, tensor shapes; the tokenizer's vocabulary hash) and the
refusal of a checkpoint written for another model that lives in a folder of the same name;
whatever fails during a resume, the directory lock is released."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("transformers")

from conftest import running_server, small_settings
from dpo_service.engine.admission import make_engine
from dpo_service.engine.engine import Engine
from dpo_service.server import start
from dpo_service.state.files import sha256_file
from dpo_service.state.format import MANIFEST_FILE, STATE_FILE, CheckpointMismatch, manifest_digest
from server_process import AUTH

pytestmark = pytest.mark.timeout(180)

WORDS = ["the", "cat", "sat", "on", "a", "mat", ".", "dog", "ran", "far", "hello", "world"]
OTHER_WORDS = [
    "le",
    "chat",
    "assis",
    "sur",
    "un",
    "tapis",
    ".",
    "chien",
    "court",
    "loin",
    "bon",
    "jour",
]
PAIRS = [{"prompt": "the cat", "chosen": "sat on a mat .", "rejected": "ran far"}]


def _save_llama(out: Path, *, layers: int = 2, words: list[str] = WORDS) -> Path:
    """A tiny random Llama and a word-level tokenizer, saved locally (no downloads)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    out.mkdir(parents=True)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three models in folders of the same name ``llama``: ``a`` (2 layers), ``deeper``
    (3 layers, same tokenizer), ``other_vocab`` (same sizes, another vocabulary)."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "a": _save_llama(root / "one" / "llama"),
        "deeper": _save_llama(root / "two" / "llama", layers=3),
        "other_vocab": _save_llama(root / "three" / "llama", words=OTHER_WORDS),
    }


def _engine(model: Path, directory: Path, **overrides: Any) -> Engine:
    settings = small_settings(
        model=f"hf:{model}", enable_grpc=False, checkpoint_dir=directory, **overrides
    )
    engine = make_engine(settings)
    engine.load()
    return engine


def _stop(engine: Engine) -> None:
    asyncio.run(engine.stop())


@pytest.fixture
def checkpoint_of_a(models: dict[str, Path], tmp_path: Path) -> Path:
    """A checkpoint at version 1 of model ``a``, written by a real server."""
    directory = tmp_path / "ckpt"
    with (
        running_server(
            model=f"hf:{models['a']}", enable_grpc=False, checkpoint_dir=directory
        ) as srv,
        httpx.Client(base_url=srv.http_url, timeout=120) as c,
    ):
        r = c.post("/dpo/loss", json={"pairs": PAIRS, "train": True}, headers=AUTH)
        assert r.status_code == 200, r.text
    return directory


def test_the_checkpoint_records_the_hf_identity(checkpoint_of_a: Path) -> None:
    state = json.loads((checkpoint_of_a / "ckpt-000000000001" / STATE_FILE).read_text())
    model, tokenizer = state["model_config"], state["tokenizer"]
    assert model["architectures"] == ["LlamaForCausalLM"] and model["model_type"] == "llama"
    assert model["num_hidden_layers"] == 2 and model["hidden_size"] == 32
    assert model["vocab_size"] == 16 and model["kind"] == "hf"
    assert len(model["tensor_shapes_sha256"]) == 64 and model["parameters"] > 0
    assert tokenizer["vocab_size"] == 16 and len(tokenizer["vocab_sha256"]) == 64


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ("deeper", "num_hidden_layers: checkpoint 2 != loaded 3"),
        ("other_vocab", "tokenizer vocab_sha256: checkpoint"),
    ],
)
def test_a_real_server_refuses_another_models_checkpoint(
    checkpoint_of_a: Path, models: dict[str, Path], other: str, expected: str
) -> None:
    """Same folder name, another model: start-up stops with the documented error, and the
    directory lock is released (the right model then resumes)."""
    settings = small_settings(model=f"hf:{models[other]}", checkpoint_dir=checkpoint_of_a)
    with pytest.raises(CheckpointMismatch, match="was written for a different model") as info:
        asyncio.run(start(settings))
    assert expected in str(info.value)
    engine = _engine(models["a"], checkpoint_of_a)
    assert engine.version == 1
    _stop(engine)


def _forget_identity(path: Path) -> None:
    """Make ``path`` look written before the identity was recorded (model_config empty)."""
    state = json.loads((path / STATE_FILE).read_text())
    state["model_config"] = {}
    (path / STATE_FILE).write_text(json.dumps(state))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    entry = manifest["files"][STATE_FILE]
    entry["sha256"], entry["bytes"] = (
        sha256_file(path / STATE_FILE),
        (path / STATE_FILE).stat().st_size,
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_an_old_checkpoint_without_identity_is_checked_by_shapes(
    checkpoint_of_a: Path, models: dict[str, Path]
) -> None:
    """A checkpoint that recorded no identity (the old writer) is refused by its tensor names
    and shapes instead of crashing in ``load_state_dict``; the lock is released."""
    _forget_identity(checkpoint_of_a / "ckpt-000000000001")
    with pytest.raises(
        CheckpointMismatch,
        match=r"missing tensor model\.model\.layers\.2\.",
    ):
        _engine(models["deeper"], checkpoint_of_a)
    engine = _engine(models["a"], checkpoint_of_a)  # still resumes onto the right model
    assert engine.version == 1
    _stop(engine)


def test_a_crash_during_restore_releases_the_lock(
    checkpoint_of_a: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dpo_service.engine.checkpointing as checkpointing

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated crash while restoring")

    monkeypatch.setattr(checkpointing, "restore_state", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _engine(models["a"], checkpoint_of_a)
    monkeypatch.undo()
    engine = _engine(models["a"], checkpoint_of_a)  # a second engine can lock the directory
    assert engine.version == 1
    _stop(engine)
