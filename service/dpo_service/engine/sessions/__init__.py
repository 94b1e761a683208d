"""Training sessions: one LoRA adapter (PEFT) per remote trainer on one shared frozen base
(issue 12). See :mod:`dpo_service.engine.sessions.registry`."""
