"""Chat templates: conversational pairs to token ids, as TRL's DPO data preparation does it.

A conversational pair arrives as three message lists (``prompt``, ``chosen``, ``rejected``;
an implicit prompt already split off, see :func:`dpo_service.conversations.split_conversation`).
They are rendered to text exactly as TRL's ``maybe_apply_chat_template`` renders a preference
example, then tokenized as TRL's ``DPOTrainer.tokenize_row`` tokenizes it:

1. ``prompt_text = render(prompt, add_generation_prompt=True)`` when the prompt ends with a
   user message, ``render(prompt, continue_final_message=True)`` when it ends with an
   assistant message;
2. ``full = render(prompt + chosen)``; the prompt text is cut to its common prefix with
   ``full`` and ``chosen_text = full[len(prompt_text):]``; then the same for ``rejected``
   (TRL's guard for templates whose generation prompt differs from the next turn);
3. Hugging Face tokenizers: ``tokenizer(text, add_special_tokens=False)`` for each part (the
   template writes BOS itself), and the EOS id appended to each response.

Hugging Face models use the tokenizer's own ``chat_template`` (a tokenizer without one is
refused). The built-in model (byte tokenizer, no template) uses :func:`builtin_render`:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n

one ``<|{role}|>\\n{content}\\n`` block per message, the generation prompt being
``<|assistant|>\\n``; ``continue_final_message`` leaves the last block's final newline off.
Its parts are then tokenized like text triples: ``[BOS] + prompt`` and ``response + [EOS]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import takewhile
from typing import Any, Protocol

from dpo_service.models.bundle import TripleTokenizer
from modern_llm.alignment.logprobs import PairTokens

__all__ = ["NoChatTemplateError", "builtin_render", "encode_conversation", "render_texts"]

Messages = Sequence[dict[str, str]]


class Render(Protocol):
    def __call__(
        self, messages: Messages, *, add_generation_prompt: bool, continue_final_message: bool
    ) -> str: ...


class NoChatTemplateError(ValueError):
    """The Hugging Face tokenizer has no chat template to render messages with."""


def builtin_render(
    messages: Messages, *, add_generation_prompt: bool = False, continue_final_message: bool = False
) -> str:
    """The built-in model's template (see the module docstring)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    if continue_final_message and messages:
        text = text[:-1]
    elif add_generation_prompt:
        text += "<|assistant|>\n"
    return text


def _common_prefix(a: str, b: str) -> str:
    return "".join(x for x, _ in takewhile(lambda p: p[0] == p[1], zip(a, b, strict=False)))


def render_texts(
    render: Render, prompt: Messages, chosen: Messages, rejected: Messages
) -> tuple[str, str, str]:
    """``(prompt_text, chosen_text, rejected_text)`` as TRL's preference rendering gives them
    (steps 1 and 2 of the module docstring)."""
    last = prompt[-1]["role"]
    text = render(
        prompt,
        add_generation_prompt=last == "user",
        continue_final_message=last == "assistant",
    )
    full_chosen = render(
        [*prompt, *chosen], add_generation_prompt=False, continue_final_message=False
    )
    text = _common_prefix(text, full_chosen)
    chosen_text = full_chosen[len(text) :]
    full_rejected = render(
        [*prompt, *rejected], add_generation_prompt=False, continue_final_message=False
    )
    text = _common_prefix(text, full_rejected)
    return text, chosen_text, full_rejected[len(text) :]


def _hf_render(inner: Any) -> Render:
    if not getattr(inner, "chat_template", None):
        raise NoChatTemplateError(
            "the model's tokenizer has no chat template: send text or token ids instead"
        )

    def render(
        messages: Messages, *, add_generation_prompt: bool, continue_final_message: bool
    ) -> str:
        out = inner.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        return str(out)

    return render


def encode_conversation(
    tokenizer: TripleTokenizer, prompt: Messages, chosen: Messages, rejected: Messages
) -> PairTokens:
    """Token ids of a conversational pair (see the module docstring). Raises
    :class:`NoChatTemplateError` for a Hugging Face tokenizer without a template."""
    inner = getattr(tokenizer, "inner", None)
    if inner is None or not hasattr(inner, "apply_chat_template"):  # the built-in model
        texts = render_texts(builtin_render, prompt, chosen, rejected)
        return tokenizer.encode_triple(*texts)
    p, c, r = render_texts(_hf_render(inner), prompt, chosen, rejected)

    def ids(text: str) -> list[int]:
        return list(inner(text, add_special_tokens=False)["input_ids"])

    eos = [inner.eos_token_id] if inner.eos_token_id is not None else []
    return PairTokens(prompt=ids(p), chosen=ids(c) + eos, rejected=ids(r) + eos)
