"""From a validated :class:`LossRequest` to a :class:`PreparedRequest` the engine can run.

Everything that can be wrong with a request is found here, before it reaches the model:
tokens outside the vocabulary, empty responses, sequences past the model's length, reference
log-probs given for only some pairs, limits. Each error names the field and the pair index.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo_service.errors import ErrorCode, ServiceError, invalid
from dpo_service.models.bundle import TripleTokenizer
from dpo_service.schemas import LossRequest, TextPair
from modern_llm.alignment.dpo_loss import LossConfig
from modern_llm.alignment.logprobs import PairTokens


@dataclass(frozen=True)
class Limits:
    """Per-request limits (from settings and the model)."""

    vocab_size: int
    max_sequence_tokens: int
    max_pairs: int
    max_request_tokens: int
    has_reference: bool = False


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

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    @property
    def batch_tokens(self) -> int:
        """Positions the two-row layout would process: the batching budget unit."""
        return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs)


def _check_ids(ids: list[int], where: str, vocab_size: int) -> None:
    for j, tok in enumerate(ids):
        if tok < 0 or tok >= vocab_size:
            raise invalid(
                f"{where}[{j}]", f"token id {tok} is outside the vocabulary [0, {vocab_size})"
            )


def _tokenize(request: LossRequest, tokenizer: TripleTokenizer, limits: Limits) -> list[PairTokens]:
    out: list[PairTokens] = []
    for i, pair in enumerate(request.pairs):
        if isinstance(pair, TextPair):
            tokens = tokenizer.encode_triple(pair.prompt, pair.chosen, pair.rejected)
            names = ("prompt", "chosen", "rejected")
        else:
            tokens = PairTokens(
                list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids)
            )
            names = ("prompt_ids", "chosen_ids", "rejected_ids")
            for name, ids in zip(
                names, (tokens.prompt, tokens.chosen, tokens.rejected), strict=True
            ):
                _check_ids(ids, f"pairs[{i}].{name}", limits.vocab_size)
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


def prepare(request: LossRequest, tokenizer: TripleTokenizer, limits: Limits) -> PreparedRequest:
    """Validate ``request`` against the model and limits, and tokenize it."""
    if len(request.pairs) > limits.max_pairs:
        raise invalid(
            "pairs", f"{len(request.pairs)} pairs, more than the limit of {limits.max_pairs}"
        )
    try:
        loss = LossConfig(
            loss_type=request.loss_type,
            beta=request.beta,
            label_smoothing=request.label_smoothing,
            simpo_gamma=request.simpo_gamma,
        )
    except ValueError as exc:
        raise invalid("loss_type", str(exc)) from exc
    pairs = _tokenize(request, tokenizer, limits)
    num_tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    if num_tokens > limits.max_request_tokens:
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT,
            f"pairs: the request has {num_tokens} tokens, more than the limit of "
            f"{limits.max_request_tokens}",
        )
    reference, ref_c, ref_r = _references(request)
    if reference == "frozen" and not limits.has_reference:
        raise invalid(
            "reference",
            "the service keeps no frozen reference copy (start it with DPO_KEEP_REFERENCE=true)",
        )
    if request.expected_version is not None and not request.train:
        raise invalid("expected_version", "only meaningful with train=true")
    return PreparedRequest(
        pairs=pairs,
        loss=loss,
        reference=reference,
        reference_chosen=ref_c,
        reference_rejected=ref_r,
        train=request.train,
        request_id=request.request_id,
        expected_version=request.expected_version,
        num_tokens=num_tokens,
    )
