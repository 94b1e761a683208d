"""The torchrun world this process belongs to: rank, size, device, the parallel scheme, and
the agreement and failure rules every collective follows.

- **Which world.** ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` come from torchrun (read by
  :class:`~dpo_service.settings.Settings`); ``MASTER_ADDR`` / ``MASTER_PORT`` are read by
  ``torch.distributed`` itself (``init_method="env://"``). A world of one never initialises
  a process group, so a plain ``dpo-service serve`` is unchanged.
- **Backend.** ``DPO_DIST_BACKEND=auto``: ``nccl`` when the device is CUDA, else ``gloo``.
  Commands (:mod:`.wire`) always travel on a gloo group whose timeout is a year, so idle
  followers can wait for the next request indefinitely; every data collective runs on the
  default group, bounded by ``DPO_DIST_TIMEOUT_S``.
- **Failure.** Any collective that raises (a peer died: gloo sees the closed socket; or the
  timeout) marks the world broken: :class:`WorldFailure` (503 / UNAVAILABLE) from then on for
  every call, and ``on_broken`` tells the server to go not-ready and exit
  (:data:`~dpo_service.server.EXIT_WORLD_FAILED`). No rank steps alone: every step needs every
  rank's gradients and an all-rank agreement (:meth:`World.agree`).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dpo_service.errors import ErrorCode, ServiceError
from dpo_service.settings import Settings

log = logging.getLogger(__name__)

#: Timeout of the command channel: followers wait for rank 0's next command this long.
COMMAND_TIMEOUT = datetime.timedelta(days=365)


class WorldFailure(ServiceError):
    """A rank is gone or a collective failed: the service cannot step (503 / UNAVAILABLE)."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE,
            f"a rank of the distributed world failed ({reason}); the service is shutting "
            "down to restart from its last checkpoint",
        )
        self.reason = reason


@dataclass
class World:
    """This process's place in the world and the handles every collective uses."""

    rank: int
    size: int
    device: torch.device
    backend: str
    parallel: str  # "ddp" or "fsdp" (resolved; see parallel.choose_parallel)
    commands: Any = None  # the gloo process group of the command channel
    broken: str | None = None
    on_broken: Callable[[str], None] | None = None
    models: dict[str, Any] = field(default_factory=dict)  # key -> local model object
    keys: dict[int, str] = field(default_factory=dict)  # id(model) -> key
    wrapped: dict[int, Any] = field(default_factory=dict)  # id(model) -> DDP/FSDP view

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ model registry
    def register(self, key: str, model: Any) -> None:
        """Name ``model`` so rank 0's commands can refer to it (the same key on every rank)."""
        self.models[key] = model
        self.keys[id(model)] = key

    def unregister(self, key: str) -> None:
        model = self.models.pop(key, None)
        if model is not None:
            self.keys.pop(id(model), None)
            self.wrapped.pop(id(model), None)

    def key_of(self, model: Any) -> str:
        key = self.keys.get(id(model))
        if key is None:
            raise RuntimeError(f"model {type(model).__name__} is not registered in the world")
        return key

    def model(self, key: str) -> Any:
        return self.models[key]

    def train_view(self, model: Any) -> Any:
        """The DDP/FSDP view ``model`` trains through (``model`` itself when not wrapped)."""
        return self.wrapped.get(id(model), model)

    # ------------------------------------------------------------ collectives
    def check(self) -> None:
        if self.broken is not None:
            raise WorldFailure(self.broken)

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run collectives (or a whole protocol step of them): any exception but a
        :class:`ServiceError` breaks the world, since the ranks can no longer be in step
        (see the module docstring)."""
        self.check()
        try:
            yield
        except ServiceError:  # WorldFailure, or a refusal every rank already agreed on
            raise
        except Exception as exc:  # a collective failed, or a rank left the protocol midway
            self.fail(f"{what}: {type(exc).__name__}: {exc}")
            raise WorldFailure(self.broken or what) from None

    def fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.error("distributed world failed: %s", reason)
            if self.on_broken is not None:
                self.on_broken(reason)

    def agree(self, ok: bool) -> bool:
        """True only when every rank passes True (all-reduce MIN): rank 0's decision about
        a step meets every rank's own checks of its shard."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        with self.guard("agree"):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        with self.guard("all_reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        with self.guard("broadcast"):
            dist.broadcast(t, src=0)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.size)]
        with self.guard("all_gather"):
            dist.all_gather(out, t)
        return out


_WORLD: World | None = None


def current() -> World | None:
    """The world when this process is one rank of several, else None."""
    return _WORLD if _WORLD is not None and _WORLD.size > 1 else None


def agree(ok: bool) -> bool:
    """:meth:`World.agree` under torchrun; ``ok`` itself in a world of one."""
    world = current()
    return ok if world is None else world.agree(ok)


def resolve_backend(settings: Settings, device: torch.device) -> str:
    if settings.dist_backend != "auto":
        return settings.dist_backend
    return "nccl" if device.type == "cuda" else "gloo"


def world_device(settings: Settings) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when ``DPO_DEVICE`` is auto/cuda and CUDA
    is present, else what ``DPO_DEVICE`` names."""
    name = settings.device
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", settings.local_rank)
    return torch.device("cpu" if name == "auto" else name)


def init_world(settings: Settings) -> World | None:
    """Join the torchrun world (a no-op returning None when ``WORLD_SIZE`` is 1)."""
    global _WORLD
    if settings.world_size <= 1:
        return None
    device = world_device(settings)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = resolve_backend(settings, device)
    timeout = datetime.timedelta(seconds=settings.dist_timeout_s)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    _WORLD = World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        device=device,
        backend=backend,
        parallel="ddp",  # resolved once the model is loaded (parallel.choose_parallel)
        commands=commands,
    )
    log.info("rank %d of %d on %s (%s)", _WORLD.rank, _WORLD.size, device, backend)
    return _WORLD


def close_world() -> None:
    """Leave the process group (after a clean shutdown)."""
    global _WORLD
    if _WORLD is not None and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken world: nothing to tear down cleanly
            log.debug("destroy_process_group failed", exc_info=True)
    _WORLD = None
