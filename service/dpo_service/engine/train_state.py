"""The training state the engine's worker thread owns: model bundle, optimizer, the frozen
reference copy, the model version and the idempotency memory of train results."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dpo_service.engine.results import LossResult
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import CausalLM

#: Train results remembered in memory for idempotent retries (oldest forgotten first).
IDEMPOTENCY_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Remembered:
    """One remembered train step: its result and the digest of the request that applied it
    (None for entries restored from a record that had none)."""

    result: LossResult
    digest: str | None = None


class IdempotencyMemory:
    """``request_id`` → the step it applied (:class:`Remembered`), oldest first, bounded."""

    def __init__(self, capacity: int = IDEMPOTENCY_CACHE_SIZE) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Remembered] = OrderedDict()

    def get(self, request_id: str) -> LossResult | None:
        """The remembered result of ``request_id``, if any."""
        entry = self._entries.get(request_id)
        return None if entry is None else entry.result

    def entry(self, request_id: str) -> Remembered | None:
        return self._entries.get(request_id)

    def __getitem__(self, request_id: str) -> LossResult:
        return self._entries[request_id].result

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdempotencyMemory):
            return NotImplemented
        return list(self._entries.items()) == list(other._entries.items())

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, request_id: str, result: LossResult, digest: str | None = None) -> None:
        self._entries[request_id] = Remembered(result, digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def recent(self, n: int) -> list[tuple[str, Remembered]]:
        """The ``n`` newest entries, oldest first."""
        return list(self._entries.items())[-n:] if n > 0 else []

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def frozen_copy(model: torch.nn.Module) -> CausalLM:
    """A copy of ``model`` in eval mode with every parameter frozen (the reference policy)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref  # type: ignore[return-value]


@dataclass
class TrainState:
    """Model, optimizer, reference copy, version and the idempotency record."""

    bundle: ModelBundle
    optimizer: torch.optim.Optimizer
    reference: CausalLM | None
    version: int = 0
    completed: IdempotencyMemory = field(default_factory=IdempotencyMemory)
    last_train_loss: float | None = None

    @classmethod
    def create(cls, bundle: ModelBundle, settings: Settings) -> TrainState:
        """AdamW over the trainable parameters, and the frozen reference (the initial
        weights) when ``settings.keep_reference``."""
        model = bundle.model
        reference = frozen_copy(model) if settings.keep_reference else None
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            betas=(settings.adam_beta1, settings.adam_beta2),
        )
        return cls(bundle=bundle, optimizer=optimizer, reference=reference)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.bundle.model.parameters() if p.requires_grad]
