"""DDP and FSDP2 for the trained policy; the same start on every rank; full state on rank 0.

- **Start** (:func:`parallelize`, every rank, after rank 0 resumed its checkpoint): rank 0's
  weights, frozen reference and AdamW state are broadcast, so every rank starts from exactly
  rank 0's state (only rank 0 reads the checkpoint directory). Then the policy is wrapped:
  ``ddp``: ``DistributedDataParallel`` around a module whose ``forward`` is the model's
  ``hidden_states`` (gradients are averaged in backward, bucketed and overlapped); ``fsdp``:
  ``fully_shard`` on every decoder layer, then on that module as the root (weights, gradients
  and AdamW moments sharded; the optimizer is rebuilt over the sharded parameters and its
  state sharded from the full copy). The frozen reference and the sessions' base are not
  wrapped: every rank holds them whole.
- **Choice** (:func:`choose_parallel`): ``DPO_PARALLEL=auto`` takes ddp when the training state
  (16 bytes per float32 trainable parameter: weights, gradients, two AdamW moments) plus the
  frozen reference fits in 80% of one device (CUDA: the GPU's total memory; CPU: available
  RAM divided by the local ranks), else fsdp.
- **Checkpoints** (:func:`full_state`): gathered on rank 0 in world size 1's format (plain
  tensors, AdamW's state dict keyed by parameter index), so a checkpoint written at any world
  size resumes at any other.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dpo_service.engine.distributed import wire
from dpo_service.engine.distributed.world import World, current
from dpo_service.engine.train_state import TrainState
from dpo_service.settings import Settings
from modern_llm.alignment.linear_logps import _available_cpu_bytes

log = logging.getLogger(__name__)

#: Share of one device the training state may fill before ``auto`` shards it.
FIT_FRACTION = 0.8
#: Bytes per float32 trainable parameter: weights, gradients and AdamW's two moments.
TRAIN_BYTES_PER_PARAM = 16


class HiddenStates(nn.Module):
    """``forward`` = the causal LM's ``hidden_states``: what DDP and FSDP2 wrap (their hooks
    run on ``forward``; the log-prob head then reads ``lm_head_weight`` directly)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm.hidden_states(*args, **kwargs)  # type: ignore[operator]


class WrappedLM:
    """A :class:`~modern_llm.alignment.logprobs.CausalLM` whose ``hidden_states`` runs through
    the DDP/FSDP2 wrapper; everything else is the model's own."""

    def __init__(self, lm: Any, wrapper: nn.Module) -> None:
        self._lm = lm
        self._wrapper = wrapper

    def hidden_states(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def gather_root(self) -> None:
        """FSDP2: gather the root's weights (embeddings, final norm, head) now, a collective
        every rank runs before each pass; the log-prob head reads ``lm_head_weight`` before
        and after ``hidden_states``. A no-op under DDP or when already gathered."""
        unshard = getattr(self._wrapper, "unshard", None)
        if unshard is not None:
            unshard()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The head's weight: under FSDP2 the gathered parameter (:meth:`gather_root`; the
        root keeps it gathered through forward, ``reshard_after_forward=False``), whose
        gradient FSDP2 reduce-scatters after backward."""
        weight = self._lm.lm_head_weight
        if isinstance(weight, DTensor):
            raise RuntimeError("the LM head is still sharded: call gather_root first")
        return weight

    def __getattr__(self, item: str) -> Any:
        return getattr(self._lm, item)


def choose_parallel(
    settings: Settings, model: nn.Module, device: torch.device, has_reference: bool
) -> str:
    """``DPO_PARALLEL``, with ``auto`` resolved (see the module docstring)."""
    if settings.parallel != "auto":
        return settings.parallel
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters()) if has_reference else 0
    need = trainable * TRAIN_BYTES_PER_PARAM + frozen
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = _available_cpu_bytes() // max(1, settings.local_world_size)
    choice = "ddp" if need <= FIT_FRACTION * capacity else "fsdp"
    log.info(
        "DPO_PARALLEL=auto: %s (training state %.1f GiB, device %.1f GiB)",
        choice,
        need / 2**30,
        capacity / 2**30,
    )
    return choice


# ----------------------------------------------------------------------- rank 0's state to all
def broadcast_module(world: World, module: nn.Module) -> None:
    """Every tensor of ``module`` (parameters and buffers) takes rank 0's values."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.device == world.device:
                world.broadcast(t)
            else:
                t.copy_(world.broadcast(t.to(world.device)))


def broadcast_optimizer(
    world: World, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> None:
    """AdamW's state of ``params`` (one group, in order) takes rank 0's values."""
    ours = optimizer.state_dict()
    has = world.broadcast(torch.tensor([1 if ours["state"] else 0], device=world.device))
    if not int(has.item()):
        return
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        mine = ours["state"].get(i, {})
        entry: dict[str, Any] = {}
        for key, like in (("step", torch.zeros(())), ("exp_avg", p), ("exp_avg_sq", p)):
            value = mine.get(key, torch.zeros_like(like, dtype=torch.float32))
            entry[key] = world.broadcast(value.detach().to(world.device, copy=True)).to(
                value.device if world.is_leader else like.device
            )
        entry["step"] = entry["step"].cpu()
        state[i] = entry
    optimizer.load_state_dict({"state": state, "param_groups": ours["param_groups"]})


# ----------------------------------------------------------------------- wrapping
def _layers(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers FSDP2 shards one by one (built-in model or a transformers model)."""
    for path in ("layers", "model.layers", "model.model.layers"):
        obj: Any = lm
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise ValueError(f"DPO_PARALLEL=fsdp: no decoder layers found on {type(lm).__name__}")


def parallelize(world: World, state: TrainState, settings: Settings) -> None:
    """Every rank: rank 0's state everywhere, then the policy wrapped (module docstring)."""
    if state.scaler.is_enabled():
        raise ValueError(
            "DPO_DTYPE=float16 (loss scaling) is not supported under torchrun; use bfloat16"
        )
    model = state.bundle.model
    lm = state.bundle.causal_lm
    world.parallel = choose_parallel(settings, model, world.device, state.reference is not None)
    broadcast_module(world, model)
    if state.reference is not None:
        broadcast_module(world, state.reference)  # type: ignore[arg-type]
    params = state.trainable()
    broadcast_optimizer(world, state.optimizer, params)
    wrapper = HiddenStates(lm)  # type: ignore[arg-type]
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        ddp = DistributedDataParallel(wrapper, device_ids=ids, forward_sync_buffers=False)
        world.wrapped[id(lm)] = WrappedLM(lm, ddp)
    else:
        _shard(world, state, wrapper)
    world.register("policy", lm)
    if state.reference is not None:
        world.register("reference", state.reference)
    log.info("rank %d: policy under %s", world.rank, world.parallel)


def _shard(world: World, state: TrainState, wrapper: HiddenStates) -> None:
    """FSDP2: shard layers and root, rebuild AdamW over the shards, shard its state."""
    from torch.distributed.fsdp import fully_shard

    old = state.optimizer
    full = old.state_dict()
    for layer in _layers(wrapper.lm):
        fully_shard(layer)
    fully_shard(wrapper, reshard_after_forward=False)  # the head reads it after forward
    model = state.bundle.model
    params = [p for p in model.parameters() if p.requires_grad]
    group = {k: v for k, v in old.param_groups[0].items() if k != "params"}
    optimizer = type(old)(params)  # type: ignore[call-arg]  # AdamW: then its options
    optimizer.param_groups[0].update(group)
    if full["state"]:
        sharded: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(params):
            entry = dict(full["state"][i])
            assert isinstance(p, DTensor)  # fully_shard made every parameter a DTensor
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = distribute_tensor(
                    entry[key].to(world.device), p.device_mesh, p.placements, src_data_rank=None
                )
            sharded[i] = entry
        optimizer.load_state_dict({"state": sharded, "param_groups": full["param_groups"]})
    state.optimizer = optimizer
    state.param_names = {id(p): name for name, p in model.named_parameters()}
    world.wrapped[id(state.bundle.causal_lm)] = WrappedLM(state.bundle.causal_lm, wrapper)


# ----------------------------------------------------------------------- norms and state
def clip_grad_norm(world: World | None, params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` of ``params``' gradients; with sharded (FSDP2) gradients the squared
    norms of the local shards are summed over the ranks first. Returns the norm before
    clipping, the same on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if world is None or not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.zeros(1, dtype=torch.float32, device=world.device)
    for g in local:
        if g.numel():
            sq += g.detach().float().pow(2).sum().to(world.device)
    total = float(world.all_reduce_sum(sq).sqrt().item())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for g in local:
                g.mul_(coef)
    return total


def reduce_gradients(world: World, params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated ``params`` over the ranks (one flat all-reduce:
    the sessions' adapters, which are not under DDP)."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(world.device, torch.float32) for g in grads])
    world.all_reduce_sum(flat).div_(world.size)
    at = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[at : at + n].view_as(g).to(p.device, p.dtype)
        at += n


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_state(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every rank (FSDP2): the full weights and AdamW state dict, gathered; the same format as
    world size 1 (``model.state_dict()``, ``optimizer.state_dict()``)."""
    model = state.bundle.model
    weights = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
        for k, v in model.state_dict().items()
    }
    sd = state.optimizer.state_dict()
    opt_state = {
        i: {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in entry.items()}
        for i, entry in sd["state"].items()
    }
    return weights, {"state": opt_state, "param_groups": sd["param_groups"]}


def checkpoint_state(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rank 0: the weights and AdamW state dict a checkpoint of ``state`` holds. Under FSDP2
    the shards are gathered first (every rank joins: :data:`~wire.Op.GATHER_STATE`); under DDP
    and in a world of one rank 0's own copy is the whole state."""
    world = current()
    if (
        world is not None
        and world.parallel == "fsdp"
        and id(state.bundle.causal_lm) in world.wrapped
    ):
        wire.send(world, wire.Command(wire.Op.GATHER_STATE))
        with world.guard("gather state"):
            return full_state(state)
    return state.bundle.model.state_dict(), state.optimizer.state_dict()


def shutdown_followers() -> None:
    """Rank 0, at the end of a clean shutdown: the other ranks leave their loops (exit 0)."""
    world = current()
    if world is not None and world.broken is None:
        wire.send(world, wire.Command(wire.Op.SHUTDOWN))
