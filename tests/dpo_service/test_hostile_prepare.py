"""Request preparation refuses, per request and before batching, what the wire formats may
let through (library callers build ``LossRequest`` from Python strings); the digest that tells
a retried train request from a different one under the same ``request_id``; and the size
scans that count pairs and token ids on the raw bytes (protobuf and JSON) before parsing."""

from __future__ import annotations

import json

import pytest

from dpo_service.api.common import check_json_size
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.wire import check_wire_size
from dpo_service.engine.preparation import MAX_CHARS_PER_TOKEN, Limits, prepare
from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.models.bundle import ByteTripleTokenizer
from dpo_service.schemas import LossRequest

TOKENIZER = ByteTripleTokenizer()
LIMITS = Limits(
    vocab_size=TOKENIZER.vocab_size,
    max_sequence_tokens=64,
    max_pairs=8,
    max_request_tokens=4096,
)
TEXT = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"}


def _prepare(limits: Limits = LIMITS, **body: object) -> object:
    return prepare(LossRequest.model_validate({"pairs": [TEXT], **body}), TOKENIZER, limits)


def _refusal(limits: Limits = LIMITS, **body: object) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        _prepare(limits, **body)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    return caught.value


def test_unpaired_surrogates_are_refused_naming_the_field() -> None:
    err = _refusal(pairs=[{**TEXT, "chosen": " \ud800"}])
    assert err.errors[0].field == "pairs[0].chosen"
    assert "not valid Unicode" in err.message


def test_text_too_long_for_any_tokenization_is_refused_before_tokenizing() -> None:
    long = "x" * (LIMITS.max_sequence_tokens * MAX_CHARS_PER_TOKEN + 1)
    err = _refusal(pairs=[{**TEXT, "prompt": long}])
    assert err.errors[0].field == "pairs[0].prompt" and "characters" in err.message


def test_ids_the_tokenizer_makes_past_the_lm_head_are_refused() -> None:
    small_head = Limits(**{**LIMITS.__dict__, "vocab_size": 200})  # BOS is 256, bytes < 256
    err = _refusal(small_head)
    assert err.errors[0].field == "pairs[0].prompt"
    assert "token id 256 is outside the vocabulary [0, 200)" in err.message
    assert "tokenizer" in err.message
    byte_head = Limits(**{**LIMITS.__dict__, "vocab_size": 258})  # BOS and EOS fit, bytes do
    assert _prepare(byte_head).num_tokens > 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"loss_type": "simpo", "simpo_gamma": -1.0}, "simpo_gamma"),
        ({"loss_type": "sigmoid", "label_smoothing": 0.5}, None),  # the schema's bound: < 0.5
    ],
)
def test_loss_errors_name_their_field(extra: dict[str, object], field: str | None) -> None:
    if field is None:
        with pytest.raises(Exception, match="label_smoothing"):
            _prepare(**extra)
        return
    assert _refusal(**extra).errors[0].field == field


def test_the_digest_tells_requests_apart_and_is_stable() -> None:
    def digest(**body: object) -> str | None:
        return _prepare(**{"train": True, "request_id": "k", **body}).digest  # type: ignore[attr-defined]

    same = digest()
    assert same is not None and len(same) == 64 and digest() == same
    ids = TOKENIZER.encode_triple(TEXT["prompt"], TEXT["chosen"], TEXT["rejected"])
    as_ids = {"prompt_ids": ids.prompt, "chosen_ids": ids.chosen, "rejected_ids": ids.rejected}
    assert digest(pairs=[as_ids]) == same  # the same tokens, sent as ids
    others = [
        digest(beta=0.2),
        digest(loss_type="hinge"),
        digest(pairs=[{**TEXT, "chosen": " 5"}]),
        digest(pairs=[TEXT, TEXT]),
        digest(expected_version=3),
        digest(pairs=[{**TEXT, "reference_chosen_logp": -1.0, "reference_rejected_logp": -2.0}]),
    ]
    assert same not in others and len(set(others)) == len(others)
    assert _prepare(request_id="k").digest is None  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ size scans on bytes
def _ids_pair(n: int) -> pb.PreferencePair:
    return pb.PreferencePair(
        tokens=pb.TokenTriple(prompt_ids=[300] * n, chosen_ids=[1], rejected_ids=[2, 3])
    )


def _unpacked(n: int) -> bytes:
    """A one-pair request whose ``prompt_ids`` are sent unpacked (one field per id)."""
    triple = b"\x08\x07" * n + b"\x10\x01"  # prompt_ids = 7 (n times), chosen_ids = 1
    pair = b"\x12" + _varint(len(triple)) + triple
    return b"\x0a" + _varint(len(pair)) + pair


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def test_the_wire_scan_counts_ids_as_the_parser_does() -> None:
    msg = pb.ComputeLossRequest(pairs=[_ids_pair(5), _ids_pair(7)], request_id="x", beta=0.5)
    data = msg.SerializeToString()
    check_wire_size(data, max_pairs=2, max_request_tokens=5 + 7 + 6)  # exactly at the limits
    with pytest.raises(ServiceError, match=r"pairs: the request has 18 tokens, more than the"):
        check_wire_size(data, max_pairs=2, max_request_tokens=17)
    with pytest.raises(ServiceError, match=r"pairs: 2 pairs, more than the limit of 1"):
        check_wire_size(data, max_pairs=1, max_request_tokens=100)
    stream = pb.StreamComputeLossRequest(request=msg).SerializeToString()
    with pytest.raises(ServiceError, match="18 tokens"):
        check_wire_size(stream, max_pairs=2, max_request_tokens=17, stream=True)
    unpacked = _unpacked(1000)
    assert len(pb.ComputeLossRequest.FromString(unpacked).pairs[0].tokens.prompt_ids) == 1000
    with pytest.raises(ServiceError, match="1001 tokens"):
        check_wire_size(unpacked, max_pairs=2, max_request_tokens=1000)
    check_wire_size(unpacked, max_pairs=2, max_request_tokens=1001)
    for garbage in (b"\xff\xff\xff", data[:-1], b"\x0b\x0c", b"\x48" * 2000):
        with pytest.raises(ServiceError, match=r"not a valid dpo\.v1\.ComputeLossRequest"):
            check_wire_size(garbage, max_pairs=10, max_request_tokens=100)


def test_the_json_scan_counts_keys_not_strings() -> None:
    body = {
        "pairs": [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": []},
            {
                "prompt": 'say "prompt": and "chosen_ids": [1,2,3,4,5]',
                "chosen": "a",
                "rejected": "b",
            },
        ]
    }
    raw = json.dumps(body).encode()
    check_json_size(raw, max_pairs=2, max_request_tokens=4)
    with pytest.raises(ServiceError, match="the request has 4 tokens, more than the limit of 3"):
        check_json_size(raw, max_pairs=2, max_request_tokens=3)
    with pytest.raises(ServiceError, match="2 pairs, more than the limit of 1"):
        check_json_size(raw, max_pairs=1, max_request_tokens=100)
    spaced = b'{"pairs": [{"prompt_ids" :\n[ 1 , 2 ], "chosen_ids":[3], "rejected_ids":[4]}]}'
    with pytest.raises(ServiceError, match="4 tokens"):
        check_json_size(spaced, max_pairs=1, max_request_tokens=3)
    check_json_size(b'{"pairs": [{"prompt_ids": [1, 2', max_pairs=1, max_request_tokens=1)
