"""Chat messages in preference pairs: TRL's conversational and implicit-prompt forms.

The checks live in :mod:`dpo_service.conversations`, shared with the server so that both
refuse the same pairs with the same words; this module keeps the client's public names. The
service applies the model's chat template; the client only checks the shapes and sends them
as they are. Every check raises ``ValueError("<field>: <problem>")`` naming the field, e.g.
``chosen[1].role``.
"""

from __future__ import annotations

from dpo_service.conversations import (
    MAX_MESSAGES,
    ROLES,
    check_conversation_pair,
    check_messages,
    is_message_list,
    shared_prefix,
)

__all__ = [
    "MAX_MESSAGES",
    "ROLES",
    "check_conversation_pair",
    "check_messages",
    "is_message_list",
    "shared_prefix",
]
