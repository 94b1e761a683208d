"""Conversational pairs (TRL's conversational and implicit-prompt forms) to token ids.

The shapes are checked by :mod:`dpo_service.conversations` (the rules the client applies
too), the implicit prompt is split off, and the messages are rendered and tokenized by
:mod:`dpo_service.models.chat_template` (TRL's rendering; the built-in model's own
template). Every error names the pair and field, e.g. ``pairs[3].chosen[0].role``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from dpo_service.conversations import split_conversation
from dpo_service.errors import invalid
from dpo_service.models.bundle import TripleTokenizer
from dpo_service.models.chat_template import NoChatTemplateError, encode_conversation
from dpo_service.schemas import ConversationPair, Message
from modern_llm.alignment.logprobs import PairTokens

__all__ = ["conversation_tokens"]


def _messages(value: list[Message] | str) -> list[dict[str, str]] | str:
    if isinstance(value, list):
        return [{"role": m.role, "content": m.content} for m in value]
    return value


def _check_text(raw: dict[str, list[dict[str, str]] | str], i: int, max_chars: int) -> None:
    """Valid Unicode and not longer than any text that fits (as for text pairs)."""
    for name, value in raw.items():
        texts = [value] if isinstance(value, str) else [m["content"] for m in value]
        chars = sum(len(t) for t in texts)
        if chars > max_chars:
            raise invalid(
                f"pairs[{i}].{name}",
                f"{chars} characters cannot fit the token limits (at most {max_chars})",
            )
        for j, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = name if isinstance(value, str) else f"{name}[{j}].content"
                raise invalid(
                    f"pairs[{i}].{where}", f"not valid Unicode text: {exc.reason}"
                ) from None


def conversation_tokens(
    pair: ConversationPair,
    i: int,
    tokenizer: TripleTokenizer,
    max_chars: int,
    lock: AbstractContextManager[Any],
) -> PairTokens:
    """A conversational pair checked (:mod:`dpo_service.conversations`), its implicit prompt
    split off and rendered with the model's chat template (:mod:`..models.chat_template`)."""
    raw = {"chosen": _messages(pair.chosen), "rejected": _messages(pair.rejected)}
    if pair.prompt is not None:
        raw["prompt"] = _messages(pair.prompt)
    _check_text(raw, i, max_chars)
    try:
        prompt, chosen, rejected = split_conversation(raw)
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise invalid(f"pairs[{i}].{field}", problem) from None
    try:
        with lock:  # HF fast tokenizers are not safe to call from two threads
            return encode_conversation(tokenizer, prompt, chosen, rejected)
    except NoChatTemplateError as exc:
        raise invalid(f"pairs[{i}]", str(exc)) from None
