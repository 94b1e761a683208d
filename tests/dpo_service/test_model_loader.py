"""Model sources: the built-in model, a saved ModernDecoderLM directory, and clear errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from conftest import running_server
from dpo_service.models.loader import builtin_config, load_bundle, resolve_device
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM

PAIR = {"prompt": "Hi", "chosen": " hello", "rejected": " bye"}


def test_saved_directory_serves_the_same_numbers_as_the_model_it_came_from(tmp_path: Path) -> None:
    """`--model DIR` loads save_pretrained output: a server on the saved copy of a model gives
    exactly the loss a server on the original gives."""
    config = builtin_config(d_model=64, layers=2, heads=4, kv_heads=2, max_seq_len=256, seed=5)
    ModernDecoderLM(config).save_pretrained(tmp_path / "m")
    with running_server(enable_grpc=False, seed=5) as original:
        a = httpx.post(f"{original.http_url}/dpo/loss", json={"pairs": [PAIR]}).json()
    with running_server(enable_grpc=False, model=str(tmp_path / "m")) as saved:
        info = httpx.get(f"{saved.http_url}/v1/model").json()
        b = httpx.post(f"{saved.http_url}/dpo/loss", json={"pairs": [PAIR]}).json()
    assert info["kind"] == "modern_llm" and info["name"] == "m"
    assert b["loss"] == a["loss"] and b["chosen_logps"] == a["chosen_logps"]


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(
            str(tmp_path / "nope"), device=torch.device("cpu"), dtype=torch.float32,
            builtin=ModernDecoderConfig(),
        )  # fmt: skip


def test_vocab_smaller_than_the_tokenizer_is_refused(tmp_path: Path) -> None:
    ModernDecoderLM(ModernDecoderConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2,
                                        n_kv_heads=1)).save_pretrained(tmp_path / "small")  # fmt: skip
    with pytest.raises(ValueError, match="smaller than the byte tokenizer"):
        load_bundle(
            str(tmp_path / "small"), device=torch.device("cpu"), dtype=torch.float32,
            builtin=ModernDecoderConfig(),
        )  # fmt: skip


def test_device_auto_is_cpu_here_and_cuda_is_refused_without_a_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
