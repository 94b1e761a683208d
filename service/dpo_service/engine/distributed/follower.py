"""Ranks > 0: hold the model, execute rank 0's commands until it says stop (issue 13).

A follower has no listeners, no queue, no versions and no idempotency memory: rank 0 decides
what runs (a replayed ``request_id``, a stale ``expected_version``, a full session table are
answered there and never reach a follower), and the follower runs exactly that, in the order
rank 0's worker thread sent it. Each train command ends in the same agreements as on rank 0
(:func:`~dpo_service.engine.distributed.world.agree`), so a step is applied on every rank or on
none. A follower exits 0 on :data:`~wire.Op.SHUTDOWN` and 4 when the world fails.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable

import torch

from dpo_service.engine.distributed import sessions as dist_sessions
from dpo_service.engine.distributed import wire
from dpo_service.engine.distributed.parallel import full_state, parallelize
from dpo_service.engine.distributed.train import sharded_gradients
from dpo_service.engine.distributed.world import World, WorldFailure
from dpo_service.engine.forward import sharded_forward_logps
from dpo_service.engine.sessions.registry import SessionRegistry
from dpo_service.engine.sessions.training import add_to_buffer, step_accumulated
from dpo_service.engine.train_state import TrainState
from dpo_service.engine.train_step import NonFiniteStepError, apply_update, clip_and_check
from dpo_service.models.bundle import ModelBundle
from dpo_service.settings import Settings

log = logging.getLogger(__name__)

#: Exit status of a rank whose world failed (the server's EXIT_WORLD_FAILED).
EXIT_WORLD_FAILED = 4


class Follower:
    """One rank > 0: its copy (or shard) of the model and the command loop."""

    def __init__(
        self, settings: Settings, world: World, bundle_factory: Callable[[], ModelBundle]
    ) -> None:
        self.settings = settings
        self.world = world
        self._factory = bundle_factory
        self.state: TrainState | None = None
        self.registry: SessionRegistry | None = None

    def load(self) -> None:
        """Build the model, then take rank 0's state (:func:`parallelize`, a collective)."""
        bundle = self._factory()
        state = TrainState.create(bundle, self.settings)
        parallelize(self.world, state, self.settings)
        no_files = self.settings.model_copy(update={"checkpoint_dir": None})  # rank 0 writes
        self.registry = SessionRegistry(
            no_files, bundle, state.reference, lambda: self._factory().model
        )
        self.state = state

    def run(self) -> int:
        """Execute commands until SHUTDOWN (0) or a failed world (4). SIGTERM and SIGINT
        (torchrun passes a ``docker stop`` to every rank) are left to rank 0, which drains,
        writes the final checkpoint (a collective under FSDP2) and then sends SHUTDOWN."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            while True:
                command = wire.recv(self.world)
                if command.op is wire.Op.SHUTDOWN:
                    log.info("rank %d: shutdown", self.world.rank)
                    return 0
                self.execute(command)
        except WorldFailure as exc:
            log.error("rank %d: %s", self.world.rank, exc.reason)
            return EXIT_WORLD_FAILED
        except Exception:  # out of step with rank 0 from here on: leave the world
            log.exception("rank %d: command failed", self.world.rank)
            return EXIT_WORLD_FAILED

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("rank %d: signal %d; rank 0 decides when the world stops", self.world.rank, signum)

    def execute(self, command: wire.Command) -> None:
        assert self.state is not None and self.registry is not None
        op, world = command.op, self.world
        if op is wire.Op.FORWARD:
            model = world.model(command.text)
            pairs = wire.decode_pairs(*command.tensors)
            with torch.inference_mode():
                sharded_forward_logps(
                    world, model, pairs, self.settings, self.state.bundle, bool(command.ints[0])
                )
        elif op is wire.Op.TRAIN:
            self._train(command)
        elif op is wire.Op.SESSION_STEP:
            session = self.registry.get(command.text)
            with contextlib.suppress(NonFiniteStepError):  # rank 0 answers the request
                step_accumulated(session)
            session.accumulated.clear()
        elif op is wire.Op.SESSION_SYNC:
            dist_sessions.apply_sync(world, self.registry, command)
        elif op is wire.Op.SESSION_DELETE:
            dist_sessions.apply_delete(world, self.registry, command.text)
        elif op is wire.Op.SESSION_BASE:
            dist_sessions.apply_base(world, self.registry)
        elif op is wire.Op.HEARTBEAT:
            world.agree(True)
        elif op is wire.Op.GATHER_STATE:
            full_state(self.state)
        else:  # pragma: no cover - a newer rank 0 than this follower
            raise WorldFailure(f"unknown command {op}")

    def _train(self, command: wire.Command) -> None:
        """The train command: sharded gradients, then rank 0's step (or accumulation)."""
        assert self.state is not None and self.registry is not None
        key = command.text
        tokens, accumulate = bool(command.ints[0]), bool(command.ints[1])
        pairs = wire.decode_pairs(*command.tensors)
        session = None
        state, max_norm = self.state, self.settings.max_grad_norm
        if key != "policy":
            session = self.registry.get(key.removeprefix(dist_sessions.view_key("")))
            state = session.state
            max_norm = math.inf if accumulate else session.config.optimizer.grad_clip
        model = state.bundle.model
        state.optimizer.zero_grad(set_to_none=True)
        model.train()
        try:
            refused = sharded_gradients(
                self.world, state, pairs, self.settings, tokens=tokens, loss_of=None
            )
            if refused is not None:
                return
            try:
                clip_and_check(state, [], len(pairs), max_norm)
                if session is not None and accumulate:
                    add_to_buffer(session, len(pairs))
                else:
                    apply_update(state)
            except NonFiniteStepError:
                pass  # rank 0 answers the request; nothing was applied anywhere
        finally:
            state.optimizer.zero_grad(set_to_none=True)
            model.eval()
