"""One request cannot fail its batch-mates (issue 10, round 2, item 10): a Hugging Face model
whose tokenizer is larger than its LM head turns some *text* into token ids the model does not
have. Each such request is refused on its own (422 / INVALID_ARGUMENT, before batching);
requests coalesced with it are answered normally, on both protocols."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

pytest.importorskip("transformers")

from conftest import ServerThread, running_server
from dpo_service.api.grpc.convert import request_from_dict
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

WORDS = ["the", "cat", "sat", "on", "a", "mat", "say", "hi", "no", "yes", "good", "bad"]
BEYOND = ["zebra", "quasar", "vortex"]  # the tokenizer has them, the LM head does not
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
GOOD = {"prompt": "say hi", "chosen": "yes good", "rejected": "no"}
BAD = {"prompt": "say hi", "chosen": "yes quasar", "rejected": "no"}


def _save(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + BEYOND)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
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
        vocab_size=len(SPECIALS) + len(WORDS),  # smaller than the tokenizer
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    out = tmp_path_factory.mktemp("small-head")
    _save(out)
    with running_server(model=f"hf:{out}", max_wait_ms=200.0) as server:
        yield server


def _check_bad(field: str, message: str) -> None:
    assert field == "pairs[0].chosen", field
    assert "outside the vocabulary [0, 16)" in message and "tokenizer" in message, message


def test_an_id_past_the_lm_head_fails_only_its_own_http_request(srv: ServerThread) -> None:
    def post(pairs: list[dict[str, str]]) -> httpx.Response:
        return httpx.post(f"{srv.http_url}/dpo/loss", json={"pairs": pairs}, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(post, [[BAD], [GOOD], [GOOD, GOOD], [GOOD]]))
    bad, *good = answers
    assert bad.status_code == 422, bad.text
    _check_bad(bad.json()["errors"][0]["field"], bad.json()["detail"])
    assert [r.status_code for r in good] == [200, 200, 200], [r.text for r in good]


def test_an_id_past_the_lm_head_fails_only_its_own_grpc_call(srv: ServerThread) -> None:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = pb_grpc.DpoServiceStub(channel)
        calls = [
            stub.ComputeLoss.future(request_from_dict({"pairs": pairs}), timeout=60)
            for pairs in ([BAD], [GOOD], [GOOD, GOOD], [GOOD])
        ]
        bad: Any = calls[0].exception()
        good = [c.result() for c in calls[1:]]
    assert bad is not None and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = pb.Error.FromString(dict(bad.trailing_metadata())["dpo-error-bin"])
    _check_bad(detail.field_violations[0].field, bad.details())
    assert [len(r.losses) for r in good] == [1, 2, 1]
