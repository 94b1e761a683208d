"""Chat messages in preference pairs: TRL's conversational and implicit-prompt forms.

A conversational pair has a ``prompt`` that is a list of ``{"role", "content"}`` messages and
``chosen`` / ``rejected`` responses that are lists of assistant messages (or strings). An
implicit-prompt pair has no ``prompt``: ``chosen`` and ``rejected`` are whole conversations
that share their leading messages (the prompt) and end in assistant messages. The service
applies the model's chat template; the client only checks the shapes and sends them as they
are. Every check raises ``ValueError("<field>: <problem>")`` naming the field, e.g.
``chosen[1].role``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ROLES",
    "check_conversation_pair",
    "check_messages",
    "is_message_list",
    "shared_prefix",
]

#: Roles a message may have (those chat templates know).
ROLES = ("system", "user", "assistant", "tool")
_KEYS = frozenset({"role", "content"})


def is_message_list(value: object) -> bool:
    """A non-string sequence whose items are all mappings (a list of messages)."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes, bytearray))
        and len(value) > 0
        and all(isinstance(m, Mapping) for m in value)
    )


def check_messages(
    value: object, field: str, *, assistant_only: bool = False
) -> list[dict[str, str]]:
    """``value`` as a list of ``{"role", "content"}`` dicts (string values, known roles).

    Keys other than role and content are refused unless null (Parquet fills a struct column's
    missing fields with null), and dropped then. ``assistant_only``: a response's messages.
    """
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"{field}: expected a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{field}: the message list is empty")
    out = []
    for j, message in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: a message must be an object, got {type(message).__name__}")
        extra = sorted(str(k) for k, v in message.items() if k not in _KEYS and v is not None)
        if extra:
            raise ValueError(f"{where}.{extra[0]}: unknown message field (role, content only)")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        if assistant_only and role != "assistant":
            raise ValueError(f"{where}.role: a response holds assistant messages, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content: must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _response(value: object, field: str) -> str | list[dict[str, str]]:
    """A conversational response: a non-empty string, or a list of assistant messages."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field}: the response is empty")
        return value
    return check_messages(value, field, assistant_only=True)


def shared_prefix(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> int:
    """How many leading messages two conversations share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def check_conversation_pair(pair: Mapping[str, Any]) -> dict[str, Any]:
    """A conversational or implicit-prompt pair, checked; other keys are kept as they are.

    Raises ``ValueError`` naming the field: a message-list prompt with responses that are not
    assistant messages or strings; a string prompt with message-list responses; an implicit
    pair whose conversations share no leading message, do not differ, or go on after the
    shared prompt with anything but assistant messages.
    """
    out = dict(pair)
    prompt = pair.get("prompt")
    for side in ("chosen", "rejected"):
        if side not in pair:
            raise ValueError(f"{side}: missing")
    if prompt is not None:
        if isinstance(prompt, str):
            raise ValueError(
                "prompt: a string prompt needs string responses; with message-list responses "
                "give the prompt as a list of messages (or leave it out: implicit prompt)"
            )
        out["prompt"] = check_messages(prompt, "prompt")
        for side in ("chosen", "rejected"):
            out[side] = _response(pair[side], side)
        return out
    out.pop("prompt", None)
    chosen = check_messages(pair["chosen"], "chosen")
    rejected = check_messages(pair["rejected"], "rejected")
    n = shared_prefix(chosen, rejected)
    if n == 0:
        raise ValueError(
            "chosen: without a prompt, chosen and rejected must share their first message"
        )
    for side, conv in (("chosen", chosen), ("rejected", rejected)):
        if n == len(conv):
            raise ValueError(f"{side}: nothing follows the prompt shared with the other response")
        for j in range(n, len(conv)):
            if conv[j]["role"] != "assistant":
                raise ValueError(
                    f"{side}[{j}].role: after the shared prompt come assistant messages, "
                    f"got {conv[j]['role']!r}"
                )
    out["chosen"], out["rejected"] = chosen, rejected
    return out
