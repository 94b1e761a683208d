"""A bound on the size of a response with per-token log-probs (``return_token_logps``).

Token log-probs make a response grow with the request's response tokens: per token one
packed double (8 bytes) and one packed varint token id. The gRPC response must fit one message
(``DPO_GRPC_MAX_MESSAGE_BYTES``, 8 MiB by default), so a request whose bound does not fit is
refused before it runs, on both protocols alike (422 / INVALID_ARGUMENT naming
``return_token_logps``), never answered with a transport error after a step was applied.

At the default limits every admissible request fits: 262144 request tokens at
``8 + varint(vocab)`` bytes (11 for a vocabulary under 2^21) plus 256 pairs of per-pair fields
is under 3 MiB.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpo_service.errors import invalid
from modern_llm.alignment.logprobs import PairTokens

__all__ = ["FIXED_BYTES", "PER_PAIR_BYTES", "check_token_logps_size", "token_logps_response_bytes"]

#: Fields of a response that do not depend on the pairs (metrics, maps, scalars): a bound.
FIXED_BYTES = 4096
#: Per pair: ~14 repeated per-pair fields (≤ 10 bytes each with their share of tags) and two
#: ``TokenLogps`` messages' headers (≤ 18 bytes each): a bound.
PER_PAIR_BYTES = 14 * 10 + 2 * 18


def _varint_len(value: int) -> int:
    return max(1, (max(value, 1).bit_length() + 6) // 7)


def token_logps_response_bytes(pairs: Sequence[PairTokens], vocab_size: int) -> int:
    """An upper bound on the serialized ``ComputeLossResponse`` of ``pairs`` with token
    log-probs (also bounds the per-token part of the JSON body by a small factor)."""
    tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    return FIXED_BYTES + PER_PAIR_BYTES * len(pairs) + tokens * (8 + _varint_len(vocab_size))


def check_token_logps_size(
    pairs: Sequence[PairTokens], vocab_size: int, max_bytes: int | None
) -> None:
    """Refuse (``return_token_logps``) a request whose response may not fit ``max_bytes``."""
    if max_bytes is None:
        return
    size = token_logps_response_bytes(pairs, vocab_size)
    if size > max_bytes:
        raise invalid(
            "return_token_logps",
            f"the per-token log-probs of these {len(pairs)} pairs may take {size} bytes, more "
            f"than one response may hold ({max_bytes}, DPO_GRPC_MAX_MESSAGE_BYTES): send fewer "
            "pairs per request",
        )
