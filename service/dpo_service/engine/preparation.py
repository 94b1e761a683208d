"""From a validated :class:`LossRequest` to a :class:`PreparedRequest` the engine can run.

Everything that can be wrong with a request is found here, before it reaches the model and
before it is batched with other requests: text that is not valid Unicode, text too long for
any tokenization to fit the limits, tokens outside the model's vocabulary (given as ids *or*
produced by the tokenizer), empty responses, sequences past the model's length, reference
log-probs given for only some pairs, limits. Each error names the field and the pair index.

The work is CPU-bound (tokenization, per-token checks, a digest): adapters run it with
:func:`off_loop`, on a small pool of threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from dpo_service.engine.conversation_tokens import conversation_tokens
from dpo_service.engine.response_size import check_token_logps_size
from dpo_service.errors import ServiceError, invalid
from dpo_service.models.bundle import TripleTokenizer
from dpo_service.schemas import ConversationPair, LossRequest, TextPair, TokenPair
from modern_llm.alignment.composed_loss import ComposedLossConfig, LossTerm
from modern_llm.alignment.dpo_loss import LossConfig
from modern_llm.alignment.logprobs import PairTokens

T = TypeVar("T")

#: Threads that parse and prepare requests (bounds how many are materialised at once).
PREPARE_THREADS = 2
#: No tokenizer packs more characters than this into one token: longer text cannot fit the
#: token limits and is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 64
_POOL = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="dpo-prepare")
# one tokenization at a time: a transformers fast tokenizer called from two threads at once
# can fail ("Already borrowed", huggingface/tokenizers#537)
_TOKENIZER_LOCK = threading.Lock()
_LOSS_FIELDS = ("loss_type", "beta", "label_smoothing", "simpo_gamma")


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` on the preparation threads (CPU-bound request work)."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args))


@dataclass(frozen=True)
class Limits:
    """Per-request limits (from settings and the model)."""

    vocab_size: int
    max_sequence_tokens: int
    max_pairs: int
    max_request_tokens: int
    has_reference: bool = False
    # largest response with per-token log-probs (the gRPC message limit); None: no limit
    max_response_bytes: int | None = None


@dataclass
class PreparedRequest:
    """A request ready for the engine: token ids, loss config, reference values."""

    pairs: list[PairTokens]
    loss: LossConfig
    reference: str  # "none" | "provided" | "frozen"
    reference_chosen: list[float] | None
    reference_rejected: list[float] | None
    train: bool
    request_id: str | None
    expected_version: int | None
    num_tokens: int  # prompt + chosen + rejected tokens (prompt once)
    # sha256 of what the step would compute (train requests with a request_id only): a
    # request_id reused with a different request is refused, not answered with the old result
    digest: str | None = None
    # loss_type given as a list (terms and weights); None: the single ``loss`` as before
    composed: ComposedLossConfig | None = None
    # also answer each response's per-token log-probs and token ids
    return_token_logps: bool = False
    # issue 12: the session this request runs on (None: the default model), and a train
    # request that only accumulates its gradient in the session (applied by a later step)
    session: str | None = None
    accumulate: bool = False

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    @property
    def batch_tokens(self) -> int:
        """Positions the two-row layout would process: the batching budget unit."""
        return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs)


def _check_ids(ids: list[int], where: str, vocab_size: int) -> None:
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return
    for j, tok in enumerate(ids):
        if tok < 0 or tok >= vocab_size:
            raise invalid(
                f"{where}[{j}]", f"token id {tok} is outside the vocabulary [0, {vocab_size})"
            )


def _check_text(pair: TextPair, i: int, max_chars: int) -> None:
    """Valid Unicode (no unpaired surrogates) and not longer than any text that fits."""
    for name in ("prompt", "chosen", "rejected"):
        text: str = getattr(pair, name)
        if len(text) > max_chars:
            raise invalid(
                f"pairs[{i}].{name}",
                f"{len(text)} characters cannot fit the token limits (at most {max_chars})",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise invalid(
                f"pairs[{i}].{name}",
                f"not valid Unicode text: {exc.reason} at character {exc.start}",
            ) from None


def _pair_tokens(
    pair: TextPair | TokenPair | ConversationPair, i: int, tokenizer: TripleTokenizer,
    limits: Limits,
) -> tuple[PairTokens, tuple[str, str, str]]:  # fmt: skip
    """One pair's token ids (every id checked against the model's vocabulary) and the names
    of its fields."""
    if isinstance(pair, ConversationPair):
        max_chars = limits.max_sequence_tokens * MAX_CHARS_PER_TOKEN
        tokens = conversation_tokens(pair, i, tokenizer, max_chars, _TOKENIZER_LOCK)
        names = ("prompt", "chosen", "rejected")
        where = "produced by the chat template and tokenizer from"
    elif isinstance(pair, TextPair):
        _check_text(pair, i, limits.max_sequence_tokens * MAX_CHARS_PER_TOKEN)
        with _TOKENIZER_LOCK:  # HF fast tokenizers are not safe to call from two threads
            tokens = tokenizer.encode_triple(pair.prompt, pair.chosen, pair.rejected)
        names = ("prompt", "chosen", "rejected")
        where = "produced by the tokenizer from"
    else:
        tokens = PairTokens(list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids))
        names = ("prompt_ids", "chosen_ids", "rejected_ids")
        where = ""
    for name, ids_ in zip(names, (tokens.prompt, tokens.chosen, tokens.rejected), strict=True):
        try:
            _check_ids(ids_, f"pairs[{i}].{name}", limits.vocab_size)
        except ServiceError as exc:
            if not where:
                raise
            # a tokenizer larger than the LM head: the text's field, not an index into it
            raise invalid(
                f"pairs[{i}].{name}", f"{exc.errors[0].message}, {where} the text"
            ) from None
    return tokens, names


def _tokenize(request: LossRequest, tokenizer: TripleTokenizer, limits: Limits) -> list[PairTokens]:
    out: list[PairTokens] = []
    for i, pair in enumerate(request.pairs):
        tokens, names = _pair_tokens(pair, i, tokenizer, limits)
        if not tokens.prompt:
            raise invalid(f"pairs[{i}].{names[0]}", "the prompt must have at least one token")
        for name, ids in ((names[1], tokens.chosen), (names[2], tokens.rejected)):
            if not ids:
                raise invalid(f"pairs[{i}].{name}", "the response is empty after tokenization")
            total = len(tokens.prompt) + len(ids)
            if total > limits.max_sequence_tokens:
                raise invalid(
                    f"pairs[{i}].{name}",
                    f"prompt + response is {total} tokens, more than the limit of "
                    f"{limits.max_sequence_tokens}",
                )
        out.append(tokens)
    return out


def _references(request: LossRequest) -> tuple[str, list[float] | None, list[float] | None]:
    given = [
        (p.reference_chosen_logp is not None, p.reference_rejected_logp is not None)
        for p in request.pairs
    ]
    any_given = any(c or r for c, r in given)
    if request.reference == "frozen" or request.reference == "none":
        if any_given:
            raise invalid(
                "reference",
                f"reference={request.reference!r} cannot be combined with per-pair reference log-probs",
            )
        return request.reference, None, None
    if not any_given:
        return "none", None, None
    for i, (c, r) in enumerate(given):
        if not c:
            raise invalid(
                f"pairs[{i}].reference_chosen_logp",
                "missing: reference log-probs must be given for every pair or for none",
            )
        if not r:
            raise invalid(
                f"pairs[{i}].reference_rejected_logp",
                "missing: reference log-probs must be given for every pair or for none",
            )
    chosen = [float(p.reference_chosen_logp) for p in request.pairs]  # type: ignore[arg-type]
    rejected = [float(p.reference_rejected_logp) for p in request.pairs]  # type: ignore[arg-type]
    return "provided", chosen, rejected


def _composed_config(request: LossRequest) -> ComposedLossConfig | None:
    """``loss_type`` as a list: its terms and weights (None for a single name); an error
    names the field (``loss_type[1]``, ``loss_weights``, ...)."""
    if not isinstance(request.loss_type, list):
        if request.loss_weights is not None:
            raise invalid("loss_weights", "only with loss_type given as a list of terms")
        return None
    try:
        return ComposedLossConfig(
            loss_type=list(request.loss_type),
            loss_weights=request.loss_weights,
            beta=request.beta,
            label_smoothing=request.label_smoothing,
            simpo_gamma=request.simpo_gamma,
        )
    except ValueError as exc:
        message = str(exc)
        name = message.split(" ", 1)[0].rstrip(":")
        if not name.startswith(("loss_type", "loss_weights", *_LOSS_FIELDS)):
            name = "loss_type"
        raise invalid(name, message.removeprefix(name).lstrip(": ")) from exc


def _loss_config(request: LossRequest, composed: ComposedLossConfig | None) -> LossConfig:
    """The loss and its hyper-parameters; an error names the field that is wrong. A composed
    loss reports the rewards of its first preference term (sigmoid's when it has none)."""
    if composed is not None:
        return composed.term_config(composed.reward_term or LossTerm.SIGMOID)
    assert not isinstance(request.loss_type, list)
    try:
        return LossConfig(
            loss_type=request.loss_type,
            beta=request.beta,
            label_smoothing=request.label_smoothing,
            simpo_gamma=request.simpo_gamma,
        )
    except ValueError as exc:
        message = str(exc)
        name = next((f for f in _LOSS_FIELDS if message.startswith(f + " ")), "loss_type")
        raise invalid(name, message.removeprefix(name + " ")) from exc


def request_digest(prepared: PreparedRequest) -> str:
    """sha256 over everything a train step computes from: token ids, the loss and its
    hyper-parameters, the reference and its values, and ``expected_version``."""
    h = hashlib.sha256()
    loss = prepared.loss
    h.update(
        repr(
            (
                "dpo-train-v1",
                str(loss.loss_type.value),
                float(loss.beta).hex(),
                float(loss.label_smoothing).hex(),
                float(loss.simpo_gamma).hex(),
                prepared.reference,
                prepared.expected_version,
                len(prepared.pairs),
            )
        ).encode()
    )
    if prepared.composed is not None or prepared.return_token_logps:  # absent: digests as before
        composed = prepared.composed
        terms = (
            []
            if composed is None
            else [(t.value, w.hex()) for t, w in zip(composed.terms, composed.weights, strict=True)]
        )
        h.update(repr(("issue14", terms, prepared.return_token_logps)).encode())
    for values in (prepared.reference_chosen, prepared.reference_rejected):
        h.update(b"ref:" + (array("d", values).tobytes() if values is not None else b"-"))
    for pair in prepared.pairs:
        for ids in (pair.prompt, pair.chosen, pair.rejected):
            h.update(len(ids).to_bytes(8, "little"))
            h.update(array("q", ids).tobytes())
    return h.hexdigest()


def prepare(request: LossRequest, tokenizer: TripleTokenizer, limits: Limits) -> PreparedRequest:
    """Validate ``request`` against the model and limits, and tokenize it (CPU-bound: adapters
    call it through :func:`off_loop`)."""
    if len(request.pairs) > limits.max_pairs:
        raise invalid(
            "pairs", f"{len(request.pairs)} pairs, more than the limit of {limits.max_pairs}"
        )
    composed = _composed_config(request)
    loss = _loss_config(request, composed)
    pairs = _tokenize(request, tokenizer, limits)
    num_tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    if num_tokens > limits.max_request_tokens:
        raise invalid(
            "pairs",
            f"the request has {num_tokens} tokens, more than the limit of "
            f"{limits.max_request_tokens}",
        )
    if request.return_token_logps:
        check_token_logps_size(pairs, limits.vocab_size, limits.max_response_bytes)
    reference, ref_c, ref_r = _references(request)
    if reference == "frozen" and not limits.has_reference:
        raise invalid(
            "reference",
            "the service keeps no frozen reference copy (start it with DPO_KEEP_REFERENCE=true)",
        )
    if request.expected_version is not None and not request.train:
        raise invalid("expected_version", "only meaningful with train=true")
    prepared = PreparedRequest(
        pairs=pairs,
        loss=loss,
        reference=reference,
        reference_chosen=ref_c,
        reference_rejected=ref_r,
        train=request.train,
        request_id=request.request_id,
        expected_version=request.expected_version,
        num_tokens=num_tokens,
        composed=composed,
        return_token_logps=request.return_token_logps,
    )
    if prepared.train and prepared.request_id is not None:
        prepared.digest = request_digest(prepared)
    return prepared
