"""Chat messages in preference pairs: TRL's conversational and implicit-prompt forms.

Pure shape checks shared by the server (``engine/preparation``) and the Python client
(``client/messages`` re-exports them), so both refuse the same pairs with the same words.

A conversational pair has a ``prompt`` that is a list of ``{"role", "content"}`` messages and
``chosen`` / ``rejected`` responses that are lists of assistant messages (or strings). An
implicit-prompt pair has no ``prompt``: ``chosen`` and ``rejected`` are whole conversations
that share their leading messages (the prompt) and end in assistant messages. Every check
raises ``ValueError("<field>: <problem>")`` naming the field, e.g. ``chosen[1].role``.

Rules (the same on both sides): roles are system, user, assistant or tool; a ``system``
message only comes first; every content is a non-empty string; a response holds assistant
messages only; the prompt ends with a ``user`` message (or an ``assistant`` one, which the
response then continues, as TRL's ``continue_final_message``); at most
:data:`MAX_MESSAGES` messages per field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_MESSAGES",
    "ROLES",
    "check_conversation_pair",
    "check_messages",
    "is_message_list",
    "shared_prefix",
    "split_conversation",
]

#: Roles a message may have (those chat templates know).
ROLES = ("system", "user", "assistant", "tool")
#: Messages one field (prompt, chosen or rejected) may hold.
MAX_MESSAGES = 256
_KEYS = frozenset({"role", "content"})
Messages = list[dict[str, str]]


def is_message_list(value: object) -> bool:
    """A non-string sequence whose items are all mappings (a list of messages)."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes, bytearray))
        and len(value) > 0
        and all(isinstance(m, Mapping) for m in value)
    )


def _message(message: object, where: str, index: int, assistant_only: bool) -> dict[str, str]:
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
    if role == "system" and index > 0:
        raise ValueError(f"{where}.role: a system message may only come first")
    if not isinstance(content, str):
        raise ValueError(f"{where}.content: must be a string, got {type(content).__name__}")
    if not content:
        raise ValueError(f"{where}.content: the message is empty")
    return {"role": role, "content": content}


def check_messages(value: object, field: str, *, assistant_only: bool = False) -> Messages:
    """``value`` as a list of ``{"role", "content"}`` dicts (string values, known roles).

    Keys other than role and content are refused unless null (Parquet fills a struct column's
    missing fields with null), and dropped then. ``assistant_only``: a response's messages.
    """
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"{field}: expected a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{field}: the message list is empty")
    if len(value) > MAX_MESSAGES:
        raise ValueError(f"{field}: {len(value)} messages, more than the limit of {MAX_MESSAGES}")
    return [_message(m, f"{field}[{j}]", j, assistant_only) for j, m in enumerate(value)]


def _response(value: object, field: str) -> str | Messages:
    """A conversational response: a non-empty string, or a list of assistant messages."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field}: the response is empty")
        return value
    return check_messages(value, field, assistant_only=True)


def shared_prefix(chosen: Messages, rejected: Messages) -> int:
    """How many leading messages two conversations share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _check_prompt_end(prompt: Messages, field: str) -> None:
    last = prompt[-1]["role"]
    if last not in ("user", "assistant"):
        raise ValueError(
            f"{field}[{len(prompt) - 1}].role: the prompt must end with a user message (or an "
            f"assistant message the response continues), got {last!r}"
        )


def _implicit(pair: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
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
    _check_prompt_end(chosen[:n], "chosen")
    out["chosen"], out["rejected"] = chosen, rejected
    return out


def check_conversation_pair(pair: Mapping[str, Any]) -> dict[str, Any]:
    """A conversational or implicit-prompt pair, checked; other keys are kept as they are.

    Raises ``ValueError`` naming the field: a message-list prompt with responses that are not
    assistant messages or strings; a string prompt with message-list responses; an implicit
    pair whose conversations share no leading message, do not differ, or go on after the
    shared prompt with anything but assistant messages; any message breaking the rules of
    the module docstring.
    """
    out = dict(pair)
    prompt = pair.get("prompt")
    for side in ("chosen", "rejected"):
        if side not in pair:
            raise ValueError(f"{side}: missing")
    if prompt is None:
        out.pop("prompt", None)
        return _implicit(pair, out)
    if isinstance(prompt, str):
        raise ValueError(
            "prompt: a string prompt needs string responses; with message-list responses "
            "give the prompt as a list of messages (or leave it out: implicit prompt)"
        )
    out["prompt"] = check_messages(prompt, "prompt")
    _check_prompt_end(out["prompt"], "prompt")
    for side in ("chosen", "rejected"):
        out[side] = _response(pair[side], side)
    return out


def split_conversation(pair: Mapping[str, Any]) -> tuple[Messages, Messages, Messages]:
    """``(prompt, chosen, rejected)`` message lists of a pair :func:`check_conversation_pair`
    accepts: an implicit prompt is the shared leading messages (TRL's ``extract_prompt``),
    and a string response is one assistant message."""
    checked = check_conversation_pair(pair)
    if "prompt" not in checked:
        chosen, rejected = checked["chosen"], checked["rejected"]
        n = shared_prefix(chosen, rejected)
        return chosen[:n], chosen[n:], rejected[n:]

    def as_messages(value: str | Messages) -> Messages:
        return [{"role": "assistant", "content": value}] if isinstance(value, str) else value

    return checked["prompt"], as_messages(checked["chosen"]), as_messages(checked["rejected"])
