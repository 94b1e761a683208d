"""The training state the engine's worker thread owns: model bundle, optimizer, the frozen
reference copy, the model version and the idempotency memory of train results."""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_service.engine.precision import (
    PARAM_DTYPE,
    REDUCTION_DTYPE,
    compute_dtype_of,
    dtype_name,
    linear_dtype,
    make_scaler,
    memory_report,
    store_frozen_in,
)
from dpo_service.engine.results import LossResult
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings, StepRollback
from modern_llm.alignment.logprobs import CausalLM

log = logging.getLogger(__name__)

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


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A copy of ``model`` in eval mode with every parameter frozen (the reference policy);
    its linear layers are stored in ``dtype`` (the compute dtype: see
    :func:`~dpo_service.engine.precision.store_frozen_in`)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    store_frozen_in(ref, dtype)
    return ref  # type: ignore[return-value]


def _master_weights(model: torch.nn.Module) -> None:
    """Make the trainable parameters float32 master weights (a model loaded in a half dtype
    is cast up once: AdamW must never update half-precision weights in place)."""
    if any(p.requires_grad and p.dtype != PARAM_DTYPE for p in model.parameters()):
        log.info("casting the model to %s master weights", dtype_name(PARAM_DTYPE))
        model.to(dtype=PARAM_DTYPE)


@dataclass
class TrainState:
    """Model, optimizer, reference copy, version and the idempotency record, plus the
    precision policy's pieces: the compute dtype, the float16 loss scaler and how a
    non-finite update is kept out (``rollback``; ``halted`` says why training stopped, if a
    post-step check ever failed with nothing to restore)."""

    bundle: ModelBundle
    optimizer: torch.optim.Optimizer
    reference: CausalLM | None
    version: int = 0
    completed: IdempotencyMemory = field(default_factory=IdempotencyMemory)
    last_train_loss: float | None = None
    compute_dtype: torch.dtype = torch.float32
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )
    rollback: StepRollback = StepRollback.VERIFY
    halted: str | None = None
    param_names: dict[int, str] = field(default_factory=dict)

    @classmethod
    def create(cls, bundle: ModelBundle, settings: Settings) -> TrainState:
        """AdamW over the float32 trainable parameters, and the frozen reference (the initial
        weights) when ``settings.keep_reference``."""
        model = bundle.model
        _master_weights(model)
        compute = compute_dtype_of(settings.dtype)
        device = next(model.parameters()).device
        reference = frozen_copy(model, compute) if settings.keep_reference else None
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            betas=(settings.adam_beta1, settings.adam_beta2),
        )
        return cls(
            bundle=bundle,
            optimizer=optimizer,
            reference=reference,
            compute_dtype=compute,
            scaler=make_scaler(device, compute),
            rollback=StepRollback(settings.step_rollback),
            param_names={id(p): name for name, p in model.named_parameters()},
        )

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.bundle.model.parameters() if p.requires_grad]

    def precision(self) -> dict[str, Any]:
        """The precision fields of ``EngineInfo``: the policy's dtypes and the memory held
        (:mod:`dpo_service.engine.precision`)."""
        model = self.bundle.model
        reference: torch.nn.Module | None = self.reference  # type: ignore[assignment]
        param_dtype = dtype_name(next(model.parameters()).dtype)
        return {
            "compute_dtype": dtype_name(self.compute_dtype),
            "param_dtype": param_dtype,
            "optimizer_state_dtype": param_dtype,  # AdamW keeps its moments in the param dtype
            "reduction_dtype": dtype_name(REDUCTION_DTYPE),
            "reference_dtype": None if reference is None else dtype_name(linear_dtype(reference)),
            "autocast": self.compute_dtype != torch.float32,
            "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None,
            "step_rollback": self.rollback.value,
            "memory": memory_report(
                model, self.optimizer, reference, snapshot=self.rollback is StepRollback.SNAPSHOT
            ),
        }
