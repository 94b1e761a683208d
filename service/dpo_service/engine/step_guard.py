"""Keeping a non-finite optimizer update out of the model (``DPO_STEP_ROLLBACK``).

A step is acknowledged only when every updated parameter and AdamW moment is finite. Two ways
to hold the pre-step values, chosen by ``DPO_STEP_ROLLBACK``:

- ``verify`` (default, no copy of the model): :func:`dry_run` first runs the optimizer's own
  update on copies of one tensor at a time (its parameter, moments and step counter; the
  gradient is shared, read-only) and refuses the step when any result is not finite. Nothing
  has been written then, so weights and optimizer state are bit-identical to before. The
  commit is the same optimizer code on the same inputs, so it produces exactly the values the
  dry run checked (``tests/dpo_service/test_precision.py`` checks this bit for bit). Extra
  memory: three copies of the largest tensor; extra time: the AdamW arithmetic once more. The
  post-step check (:func:`updated_finite`) still runs; if it ever fails after a passed dry
  run (a fault outside AdamW's arithmetic), the values cannot be restored, so the engine stops
  training (fail closed) until a restart resumes the last checkpoint.
- ``snapshot``: :class:`StepSnapshot` copies the trainable parameters that have gradients and
  their AdamW state to host memory before the step (12 bytes per trainable float32 element
  once the moments exist), and restores them when the post-step check fails. Exact for any
  fault, at that memory and copy cost.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def _stepped(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters the next ``optimizer.step()`` updates (those with a gradient)."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _state_tensors(state: dict[str, Any]) -> list[Tensor]:
    return [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite: one fused max-abs per tensor
    (``torch._foreach_norm`` with ord=inf: NaN and inf propagate, no overflow of a sum of
    squares) and one sync per device (AdamW keeps its step counters on the CPU)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if isinstance(t, DTensor):  # FSDP2: this rank checks its shard (then all agree)
            t = t.to_local()
        if t.numel() > 0:
            by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        norms = torch._foreach_norm(group, float("inf"))
        if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return False
    return True


def updated_finite(optimizer: torch.optim.Optimizer) -> bool:
    """After a step: the updated parameters and their optimizer state are all finite."""
    params = _stepped(optimizer)
    state = [t for p in params for t in _state_tensors(optimizer.state.get(p, {}))]
    return all_finite(params + state)


def trial_update(optimizer: torch.optim.Optimizer, param: Tensor) -> tuple[Tensor, list[Tensor]]:
    """What ``optimizer.step()`` would make of ``param`` and its state, computed on copies by
    a one-tensor optimizer of the same class and options (``param.grad`` is shared, unread
    for writing). Returns the new parameter and its new floating-point state tensors."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    shadow = nn.Parameter(param.detach().clone())
    shadow.grad = param.grad
    trial = type(optimizer)([shadow])  # type: ignore[call-arg]  # AdamW: params only
    trial.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
    state = optimizer.state.get(param)
    if state:
        trial.state[shadow] = {
            k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()
        }
    trial.step()
    return shadow.detach(), _state_tensors(trial.state[shadow])


def dry_run(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> str | None:
    """None when the next step leaves every parameter and moment finite, else the name of the
    first tensor it would not (nothing is written either way)."""
    for param in _stepped(optimizer):
        new, state = trial_update(optimizer, param)
        if not all_finite([new, *state]):
            return names.get(id(param), f"a tensor of shape {tuple(param.shape)}")
    return None


class StepSnapshot:
    """Host copies of what ``optimizer.step()`` is about to change, for :meth:`restore`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        params = _stepped(optimizer)
        self.params = [(p, p.detach().to("cpu", copy=True)) for p in params]
        self.state: dict[Tensor, dict[str, Any]] = {}
        for p in params:
            if p in optimizer.state:
                self.state[p] = {
                    k: v.detach().to("cpu", copy=True)
                    if isinstance(v, Tensor)
                    else copy.deepcopy(v)
                    for k, v in optimizer.state[p].items()
                }

    @torch.no_grad()
    def restore(self) -> None:
        """Put the parameters and optimizer state back as they were (bit for bit); state the
        step created (AdamW's first step) is removed again."""
        for p, saved in self.params:
            p.copy_(saved)
            if p not in self.state:
                self.optimizer.state.pop(p, None)
                continue
            live = self.optimizer.state[p]
            for key, value in self.state[p].items():
                if isinstance(value, Tensor) and isinstance(live.get(key), Tensor):
                    live[key].copy_(value)
                else:
                    live[key] = value
