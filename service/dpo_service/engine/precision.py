"""The precision policy: which dtype each tensor the engine holds or computes is in.

- **Parameters are float32 master weights.** The model's trainable parameters are float32
  on the device whatever ``DPO_DTYPE`` says, so AdamW updates them, and keeps its moments, in
  float32 (``param_dtype = optimizer_state_dtype = float32``); there is no second master copy.
- **``DPO_DTYPE`` is the compute dtype.** With ``bfloat16`` or ``float16`` the forward and
  backward passes (loss-only, train step, reference pass) run under
  ``torch.autocast(device, dtype)``: matmuls and attention in the half dtype, norms and the
  residual stream in float32.
- **Reductions are float32.** The LM head's log-sum-exp, the sum over response tokens and the
  loss are float32 whatever the compute dtype (``linear_token_logps`` accumulates in float32;
  the loss is computed outside autocast on float32 log-probs).
- **Frozen weights may be half.** The frozen reference copy stores its ``nn.Linear`` layers in
  the compute dtype (autocast would cast them to it on every use anyway, so at version 0 it
  computes exactly what the policy computes); embeddings, norms and weights tied to an
  embedding stay float32.
- **float16 training uses dynamic loss scaling** (``torch.amp.GradScaler``): a step whose
  scaled gradients overflow is not applied (422, counted as rejected, the scale is halved).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

#: Trainable parameters (the master weights) and AdamW's state.
PARAM_DTYPE = torch.float32
#: Log-prob reductions and the loss.
REDUCTION_DTYPE = torch.float32
_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype_of(name: str) -> torch.dtype:
    """``DPO_DTYPE`` → the compute dtype."""
    return _NAMES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for float32 compute."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(
    device: torch.device, dtype: torch.dtype, init_scale: float = 2.0**16
) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 compute (GradScaler's defaults: start at 2**16, halve
    on overflow, double after 2000 steps without one); a disabled scaler otherwise. The scale
    is not checkpointed: a restarted server starts again at ``init_scale``."""
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=dtype == torch.float16)


def _tied_to_embedding(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the ``nn.Linear`` layers of a frozen ``model`` to ``dtype`` (not those tied to an
    embedding). Under autocast to ``dtype`` the result is bit-identical: autocast casts a
    float32 linear weight to ``dtype`` on every call."""
    if dtype == torch.float32:
        return
    tied = _tied_to_embedding(model)
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in tied:
            module.to(dtype)


def linear_dtype(model: nn.Module) -> torch.dtype:
    """The storage dtype of ``model``'s linear layers (the bulk of a transformer's weights),
    else of its first parameter."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return module.weight.dtype
    return next(model.parameters()).dtype


def _bytes_by_dtype(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen:  # tied weights count once
            continue
        seen.add(id(t))
        out[dtype_name(t.dtype)] += t.numel() * t.element_size()
    return dict(sorted(out.items()))


def _module_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    # list() copies: the worker thread may be adding AdamW's first-step state meanwhile.
    for state in list(optimizer.state.values()):
        yield from (v for v in list(state.values()) if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class MemoryReport:
    """Bytes the engine holds, by dtype (see ``schemas.ModelMemory`` for each field)."""

    weights_bytes: dict[str, int]
    master_copy_bytes: int
    optimizer_state_bytes: dict[str, int]
    optimizer_state_bytes_after_step: int
    gradient_bytes: int
    rollback_snapshot_bytes: int
    reference_bytes: dict[str, int]
    total_bytes: int


def memory_report(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reference: nn.Module | None,
    *,
    snapshot: bool,
) -> MemoryReport:
    """What ``model``, ``optimizer`` and ``reference`` hold now (``total_bytes``), the AdamW
    state once it has stepped (two moments per trainable element plus a step counter per
    tensor; AdamW allocates it at its first step), and what a train step holds only while it
    runs: the gradients, and with ``snapshot`` the host copy of weights and moments."""
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    weights = _bytes_by_dtype(_module_tensors(model))
    optimizer_now = _bytes_by_dtype(_optimizer_tensors(optimizer))
    after_step = sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    ref = {} if reference is None else _bytes_by_dtype(_module_tensors(reference))
    total = sum(weights.values()) + sum(optimizer_now.values()) + sum(ref.values())
    return MemoryReport(
        weights_bytes=weights,
        master_copy_bytes=0,
        optimizer_state_bytes=optimizer_now,
        optimizer_state_bytes_after_step=after_step,
        gradient_bytes=gradients,
        rollback_snapshot_bytes=(gradients + after_step) if snapshot else 0,
        reference_bytes=ref,
        total_bytes=total,
    )
