"""Conversational pairs (TRL's conversational and implicit-prompt forms) in the service.

- token ids equal ``transformers``' ``apply_chat_template`` + TRL's prompt/response split, on
  a word-level tokenizer whose chat template is built here (no hub);
- the built-in model's own template, exactly as the README documents it;
- a conversational dataset trains end to end through the real server (built-in and HF model),
  over HTTP and gRPC, with the same numbers on both;
- bad shapes are refused on both protocols, naming the pair and the field, changing nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch

from conftest import API_KEY, ServerThread, running_server
from dpo_service.api.grpc.convert import request_from_dict, response_from_proto
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.client import DpoClient
from dpo_service.client.remote_trainer import load_pairs, train
from dpo_service.conversations import MAX_MESSAGES
from dpo_service.engine.preparation import Limits, prepare
from dpo_service.errors import ServiceError
from dpo_service.models.bundle import ByteTripleTokenizer
from dpo_service.models.chat_template import builtin_render
from dpo_service.schemas import LossRequest
from modern_llm.tokenizer import ByteTokenizer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
METADATA = (("authorization", f"Bearer {API_KEY}"),)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONAL = {
    "prompt": [msg("system", "be good"), msg("user", "what is two plus two")],
    "chosen": [msg("assistant", "four")],
    "rejected": [msg("assistant", "five probably")],
}
IMPLICIT = {
    "chosen": [msg("user", "say hi"), msg("assistant", "hello world")],
    "rejected": [msg("user", "say hi"), msg("assistant", "no")],
}
STRING_RESPONSES = {
    "prompt": [msg("user", "the cat")],
    "chosen": "sat on a mat .",
    "rejected": "ran far away",
}
CONTINUED = {  # the prompt ends with an assistant message: the responses continue it
    "prompt": [msg("user", "question"), msg("assistant", "the answer is")],
    "chosen": [msg("assistant", "four")],
    "rejected": [msg("assistant", "bad")],
}
PAIRS = [CONVERSATIONAL, IMPLICIT, STRING_RESPONSES, CONTINUED]

# ------------------------------------------------------------------ a tokenizer with a template
WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", ".", "dog", "ran", "far", "away", "hello"),
    *("world", "what", "is", "two", "plus", "four", "five", "probably", "say", "hi", "no"),
    *("yes", "good", "bad", "answer", "question", "be", "[", "]", "system", "user"),
    "assistant",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
# BOS once, "[role] content " per message, EOS after each assistant turn
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def hf_tokenizer(template: str | None = TEMPLATE) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip
    if template is not None:
        out.chat_template = template
    return out


def _template_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def _common_prefix(texts: list[str]) -> str:
    a, b = texts
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def trl_split(tok: Any, pair: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """TRL's DPO preparation, written out here as the reference: ``extract_prompt`` for the
    implicit form, ``apply_chat_template`` (generation prompt / continue final message; the
    common prefix with prompt + response), then ``tokenize_row`` (no special tokens; EOS
    appended to each response)."""
    if "prompt" not in pair:
        n = 0
        while pair["chosen"][n] == pair["rejected"][n]:
            n += 1
        pair = {"prompt": pair["chosen"][:n], "chosen": pair["chosen"][n:],
                "rejected": pair["rejected"][n:]}  # fmt: skip
    as_messages = lambda v: [msg("assistant", v)] if isinstance(v, str) else v  # noqa: E731
    prompt, chosen, rejected = (
        pair["prompt"],
        as_messages(pair["chosen"]),
        as_messages(pair["rejected"]),
    )
    last = prompt[-1]["role"]
    text = tok.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=last == "user",
        continue_final_message=last == "assistant",
    )  # fmt: skip
    full_c = tok.apply_chat_template(prompt + chosen, tokenize=False)
    text = _common_prefix([text, full_c])
    chosen_text = full_c[len(text) :]
    full_r = tok.apply_chat_template(prompt + rejected, tokenize=False)
    text = _common_prefix([text, full_r])
    rejected_text = full_r[len(text) :]

    def ids(t: str) -> list[int]:
        return list(tok(t, add_special_tokens=False)["input_ids"])

    return ids(text), [*ids(chosen_text), EOS], [*ids(rejected_text), EOS]


def _limits(vocab: int) -> Limits:
    return Limits(vocab_size=vocab, max_sequence_tokens=256, max_pairs=64, max_request_tokens=10**5)


def test_hf_token_ids_equal_apply_chat_template_and_trl_split() -> None:
    """The service's ids for every form equal TRL's, and prompt + chosen (less the appended
    EOS) is exactly the tokenized ``apply_chat_template`` of the whole conversation."""
    pytest.importorskip("transformers")
    from dpo_service.models.hf import HFTripleTokenizer

    tok = hf_tokenizer()
    prepared = prepare(LossRequest(pairs=PAIRS), HFTripleTokenizer(tok), _limits(len(tok)))
    for pair, got in zip(PAIRS, prepared.pairs, strict=True):
        prompt, chosen, rejected = trl_split(tok, pair)
        assert (got.prompt, got.chosen, got.rejected) == (prompt, chosen, rejected)
        assert 3 not in got.prompt + got.chosen + got.rejected  # no <unk>: the vocabulary fits
    conv = CONVERSATIONAL
    whole = _template_ids(tok, conv["prompt"] + conv["chosen"])
    assert prepared.pairs[0].prompt + prepared.pairs[0].chosen[:-1] == whole
    assert prepared.pairs[0].prompt[0] == BOS and prepared.pairs[0].chosen[-2:] == [EOS, EOS]


def test_builtin_template_is_the_documented_format() -> None:
    text = builtin_render(CONVERSATIONAL["prompt"], add_generation_prompt=True)
    assert text == "<|system|>\nbe good\n<|user|>\nwhat is two plus two\n<|assistant|>\n"
    cont = builtin_render(CONTINUED["prompt"], continue_final_message=True)
    assert cont == "<|user|>\nquestion\n<|assistant|>\nthe answer is"
    byte = ByteTokenizer()
    prepared = prepare(LossRequest(pairs=PAIRS), ByteTripleTokenizer(), _limits(byte.vocab_size))
    first = prepared.pairs[0]
    assert first.prompt == byte.encode(text, add_bos=True)
    assert first.chosen == byte.encode("four\n", add_eos=True)
    implicit = prepared.pairs[1]  # the shared first message is the prompt
    assert implicit.prompt == byte.encode("<|user|>\nsay hi\n<|assistant|>\n", add_bos=True)
    assert implicit.rejected == byte.encode("no\n", add_eos=True)
    assert prepared.pairs[2].chosen == byte.encode("sat on a mat .\n", add_eos=True)
    assert prepared.pairs[3].prompt == byte.encode(cont, add_bos=True)
    # TRL's split: the prompt's final message is continued up to its end, the response is a
    # new assistant message
    assert prepared.pairs[3].chosen == byte.encode("\n<|assistant|>\nfour\n", add_eos=True)


def test_hf_tokenizer_without_a_template_is_refused() -> None:
    pytest.importorskip("transformers")
    from dpo_service.models.hf import HFTripleTokenizer

    tok = hf_tokenizer(template=None)
    with pytest.raises(ServiceError) as info:
        prepare(
            LossRequest(pairs=[STRING_RESPONSES, CONVERSATIONAL]),
            HFTripleTokenizer(tok),
            _limits(len(tok)),
        )
    assert info.value.errors[0].field == "pairs[0]"
    assert "no chat template" in info.value.errors[0].message


# ------------------------------------------------------------------ end to end, both protocols
@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(lr=2e-3) as srv:
        yield srv


def _http(srv: ServerThread, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=srv.http_url, timeout=60) as c:
        return c.post("/dpo/loss", json=body, headers=AUTH)


def _grpc(srv: ServerThread, message: pb.ComputeLossRequest) -> pb.ComputeLossResponse:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        return pb_grpc.DpoServiceStub(channel).ComputeLoss(message, metadata=METADATA, timeout=60)


def test_builtin_conversations_same_numbers_on_both_protocols(server: ServerThread) -> None:
    body = {"pairs": PAIRS, "beta": 0.2, "return_token_logps": True}
    over_http = _http(server, body)
    assert over_http.status_code == 200, over_http.text
    over_grpc = response_from_proto(_grpc(server, request_from_dict(body)))
    h = over_http.json()
    for key in ("loss", "losses", "chosen_logps", "rejected_logps", "chosen_tokens",
                "num_tokens", "chosen_token_ids", "rejected_token_logps"):  # fmt: skip
        assert over_grpc[key] == h[key], key
    byte = ByteTokenizer()
    assert h["chosen_token_ids"][0] == byte.encode("four\n", add_eos=True)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dataset(tmp_path: Path) -> list[dict[str, Any]]:
    rows = [CONVERSATIONAL, IMPLICIT, STRING_RESPONSES, CONTINUED] * 2
    return load_pairs(_write_jsonl(tmp_path / "conv.jsonl", rows))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_conversational_dataset_trains_builtin(
    tmp_path: Path, server: ServerThread, protocol: str
) -> None:
    """The remote trainer sends the conversations as they are; the server renders them and
    steps: every step bumps the version by one and the loss goes down."""
    pairs = _dataset(tmp_path)
    assert isinstance(pairs[0]["prompt"], list)  # sent as messages, not pre-rendered text
    client = (
        DpoClient.http(server.http_url, API_KEY) if protocol == "http"
        else DpoClient.grpc(server.grpc_target, API_KEY)
    )  # fmt: skip
    start = server.version
    before = client.compute_loss(pairs, beta=0.5).loss
    history = train(client, pairs, steps=6, batch_size=8, beta=0.5, progress=False)
    after = client.compute_loss(pairs, beta=0.5).loss
    assert [h.model_version for h in history.train] == list(range(start + 1, start + 7))
    assert after < before


def _save_tiny_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = hf_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@pytest.mark.slow
def test_conversational_dataset_trains_hf_model(tmp_path: Path) -> None:
    """An HF model with a chat template: the ids the service scores are TRL's, HTTP and gRPC
    give the same numbers, and train steps on the conversations lower their loss."""
    pytest.importorskip("transformers")
    _save_tiny_llama(tmp_path / "llama")
    tok = hf_tokenizer()
    pairs = _dataset(tmp_path)
    with running_server(model=f"hf:{tmp_path / 'llama'}", lr=5e-3) as srv:
        body = {"pairs": PAIRS, "beta": 0.5, "return_token_logps": True}
        h = _http(srv, body).json()
        g = response_from_proto(_grpc(srv, request_from_dict(body)))
        assert g["chosen_logps"] == h["chosen_logps"] and g["losses"] == h["losses"]
        for i, pair in enumerate(PAIRS):
            _, chosen, rejected = trl_split(tok, pair)
            assert h["chosen_token_ids"][i] == chosen and h["rejected_token_ids"][i] == rejected
        assert h["num_tokens"] == sum(sum(len(x) for x in trl_split(tok, p)) for p in PAIRS)
        client = DpoClient.grpc(srv.grpc_target, API_KEY)
        before = client.compute_loss(pairs, beta=0.5).loss
        history = train(client, pairs, steps=4, batch_size=8, beta=0.5, progress=False)
        after = client.compute_loss(pairs, beta=0.5).loss
        assert len(history.train) == 4 and srv.version == 4
        assert after < before


# ------------------------------------------------------------------ hostile shapes, both protocols
def _with(pair: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**pair, **changes}


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("no assistant turn", _with(CONVERSATIONAL, chosen=[msg("user", "four")]), "pairs[1].chosen[0].role"),
    ("unknown role", _with(CONVERSATIONAL, prompt=[msg("robot", "hi")]), "pairs[1].prompt[0].role"),
    ("system not first", _with(CONVERSATIONAL, prompt=[msg("user", "a"), msg("system", "b"), msg("user", "c")]), "pairs[1].prompt[1].role"),
    ("empty content", _with(CONVERSATIONAL, rejected=[msg("assistant", "")]), "pairs[1].rejected[0].content"),
    ("prompt ends with system", _with(CONVERSATIONAL, prompt=[msg("system", "a")]), "pairs[1].prompt[0].role"),
    ("implicit without shared prefix", {"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("user", "x"), msg("assistant", "y")]}, "pairs[1].chosen"),
    ("implicit: user after the prompt", {"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("user", "a"), msg("user", "y")]}, "pairs[1].rejected[1].role"),
    ("huge message list", _with(CONVERSATIONAL, prompt=[msg("user", "a")] * (MAX_MESSAGES + 1)), "pairs[1].prompt"),
]  # fmt: skip
# JSON-only shapes (the proto's types make them unrepresentable on gRPC)
HOSTILE_JSON: list[tuple[str, dict[str, Any], str]] = [
    ("non-string content", _with(CONVERSATIONAL, chosen=[{"role": "assistant", "content": 5}]), "pairs[1].chosen[0].content"),
    ("missing role", _with(CONVERSATIONAL, chosen=[{"content": "x"}]), "pairs[1].chosen[0].role"),
    ("extra key", _with(CONVERSATIONAL, chosen=[{"role": "assistant", "content": "x", "name": "n"}]), "pairs[1].chosen[0].name"),
    ("message not an object", _with(CONVERSATIONAL, prompt=["hi"]), "pairs[1].prompt[0]"),
]  # fmt: skip


def _fields(errors: list[dict[str, str]]) -> list[str]:
    return [e["field"] for e in errors]


@pytest.mark.parametrize(
    ("case", "pair", "field"), HOSTILE + HOSTILE_JSON, ids=lambda x: x if isinstance(x, str) else ""
)
def test_bad_shapes_over_http(
    server: ServerThread, case: str, pair: dict[str, Any], field: str
) -> None:
    version = server.version
    r = _http(server, {"pairs": [CONVERSATIONAL, pair], "train": True})
    assert r.status_code == 422, (case, r.text)
    assert field in _fields(r.json()["errors"]), (case, r.json())
    assert server.version == version  # nothing was applied


def _raw_grpc_request(pair: dict[str, Any]) -> pb.ComputeLossRequest:
    """The proto of a (possibly malformed) pair, built without the client's checks."""
    message = pb.ComputeLossRequest(train=True)
    for p in (CONVERSATIONAL, pair):
        conv = pb.Conversation(prompt=[pb.Message(**m) for m in p.get("prompt", [])])
        for side in ("chosen", "rejected"):
            value = p[side]
            if isinstance(value, str):
                getattr(conv, side).text = value
            else:
                getattr(conv, side).messages.messages.extend(pb.Message(**m) for m in value)
        message.pairs.append(pb.PreferencePair(conversation=conv))
    return message


@pytest.mark.parametrize(
    ("case", "pair", "field"), HOSTILE, ids=lambda x: x if isinstance(x, str) else ""
)
def test_bad_shapes_over_grpc(
    server: ServerThread, case: str, pair: dict[str, Any], field: str
) -> None:
    version = server.version
    with pytest.raises(grpc.RpcError) as info:
        _grpc(server, _raw_grpc_request(pair))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert field in (info.value.details() or ""), (case, info.value.details())
    assert server.version == version


def test_grpc_conversation_without_a_response_is_refused(server: ServerThread) -> None:
    message = _raw_grpc_request(CONVERSATIONAL)
    message.pairs[1].conversation.ClearField("rejected")
    with pytest.raises(grpc.RpcError) as info:
        _grpc(server, message)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pairs[1].rejected" in (info.value.details() or "")
