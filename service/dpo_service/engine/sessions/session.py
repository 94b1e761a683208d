"""One training session: a LoRA adapter on the shared base with its own optimizer, version,
idempotency memory, key and accumulation buffer (issue 12). Plain data: the registry
(:mod:`dpo_service.engine.sessions.registry`) owns the sessions and runs their work on the
engine's worker thread."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dpo_service.engine.sessions.lora import AdapterView, LoraSpec
from dpo_service.engine.train_state import IdempotencyMemory, TrainState

#: Reference choices of a session: the base with the adapter off, none, or client-sent.
REFERENCES = ("base", "none", "client")
#: Step results remembered per session for idempotent ``step`` retries.
STEP_MEMORY = 1024


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW settings of one session (float32 moments)."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class SessionConfig:
    """Everything a session is created with (persisted in its checkpoint)."""

    lora: LoraSpec = field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    beta: float | None = None  # default beta of its requests (None: the request's own)
    loss_type: str | None = None
    reference: str = "base"

    def to_json(self) -> dict[str, Any]:
        return {
            "lora": self.lora.to_json(),
            "optimizer": asdict(self.optimizer),
            "beta": self.beta,
            "loss_type": self.loss_type,
            "reference": self.reference,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionConfig:
        return cls(
            lora=LoraSpec.from_json(data["lora"]),
            optimizer=OptimizerSpec(**data["optimizer"]),
            beta=data.get("beta"),
            loss_type=data.get("loss_type"),
            reference=str(data.get("reference", "base")),
        )


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StepOutcome:
    """What ``step`` answers: the new version, pairs and requests it applied, grad norm."""

    session: str
    new_model_version: int
    pairs: int
    requests: int
    grad_norm: float
    loss: float | None
    request_id: str | None = None
    replayed: bool = False


@dataclass
class Accumulated:
    """Gradients added by ``accumulate`` requests since the last step: the sums of the
    per-pair loss gradients (not yet divided by ``pairs``) and the loss sum."""

    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    pairs: int = 0
    requests: int = 0
    loss_sum: float = 0.0

    def clear(self) -> None:
        self.grads, self.pairs, self.requests, self.loss_sum = {}, 0, 0, 0.0


@dataclass
class Session:
    """One session's live state (see the module docstring)."""

    id: str
    config: SessionConfig
    key_sha256: str
    state: TrainState  # bundle.model is the session's AdapterView; trainable() its adapter
    params: dict[str, torch.nn.Parameter]
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    accumulated: Accumulated = field(default_factory=Accumulated)
    steps: OrderedDict[str, StepOutcome] = field(default_factory=OrderedDict)
    last_checkpoint_version: int | None = None

    @property
    def view(self) -> AdapterView:
        model = self.state.bundle.model
        assert isinstance(model, AdapterView)
        return model

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def completed(self) -> IdempotencyMemory:
        return self.state.completed

    def key_matches(self, presented: str | None) -> bool:
        if presented is None:
            return False
        return hmac.compare_digest(key_digest(presented), self.key_sha256)

    def remember_step(self, request_id: str, outcome: StepOutcome) -> None:
        self.steps[request_id] = outcome
        while len(self.steps) > STEP_MEMORY:
            self.steps.popitem(last=False)

    def touch(self) -> None:
        self.last_used = time.time()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def state_bytes(self) -> int:
        """Bytes of the adapter and its optimizer state (AdamW's two moments once stepped)."""
        total = sum(p.numel() * p.element_size() for p in self.params.values())
        for s in self.state.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t))
        return total

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_version": self.version,
            "steps": self.version,
            "trainable_parameters": self.trainable_parameters(),
            "state_bytes": self.state_bytes(),
            "last_loss": self.state.last_train_loss,
            "accumulated_pairs": self.accumulated.pairs,
            "accumulated_requests": self.accumulated.requests,
            "created": self.created,
            "last_used": self.last_used,
            "config": self.config.to_json(),
        }
