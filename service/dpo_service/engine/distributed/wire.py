"""Rank 0's commands to the other ranks: a fixed-size header, then tensors.

Every command is one int64 header of :data:`HEADER` slots (a magic number, the op, the
counts, up to :data:`MAX_INTS` small integers), then the UTF-8 bytes of a short key (a model or session name, at most
:data:`MAX_TEXT` bytes), and the payload tensors, each preceded by its own small shape
header. Nothing of unbounded size is pickled: a request's pairs travel as two int64 tensors
(:func:`encode_pairs`). All of it goes over the world's gloo command group
(:attr:`World.commands`, on the CPU), only from rank 0's worker thread, in one order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.distributed as dist

from dpo_service.engine.distributed.world import World
from modern_llm.alignment.logprobs import PairTokens

MAGIC = 0x44504F31  # "DPO1"
HEADER = 16
MAX_INTS = 8
MAX_TEXT = 4096
MAX_DIMS = 6
_DTYPES = [torch.int64, torch.float32, torch.float64, torch.uint8, torch.bfloat16, torch.float16]


class Op(IntEnum):
    """What the followers do next (:mod:`dpo_service.engine.distributed.follower`)."""

    SHUTDOWN = 0  # leave the loop and exit 0
    FORWARD = 1  # log-probs of pairs under a model, split by pairs (loss-only, reference)
    TRAIN = 2  # data-parallel forward/backward, then the step (or a session accumulation)
    SESSION_STEP = 3  # a session's step over its accumulated gradient
    SESSION_SYNC = 4  # (re)create a session from rank 0's snapshot
    SESSION_DELETE = 5
    GATHER_STATE = 6  # the full model and optimizer state, gathered on rank 0 (checkpoint)
    SESSION_BASE = 7  # the sessions' frozen base: build it, take rank 0's weights
    HEARTBEAT = 8  # every rank answers (an all-rank agreement): is everyone still there?


@dataclass
class Command:
    op: Op
    ints: list[int] = field(default_factory=list)
    text: str = ""
    tensors: list[torch.Tensor] = field(default_factory=list)


def _bcast(world: World, t: torch.Tensor) -> torch.Tensor:
    with world.guard("command"):
        dist.broadcast(t, src=0, group=world.commands)
    return t


def send(world: World, command: Command) -> None:
    """Rank 0: broadcast ``command`` to every rank."""
    assert world.is_leader, "only rank 0 sends commands"
    text = command.text.encode("utf-8")
    if len(command.ints) > MAX_INTS or len(text) > MAX_TEXT:
        raise ValueError("command header too large")
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[:5] = torch.tensor(
        [MAGIC, int(command.op), len(command.tensors), len(command.ints), len(text)]
    )
    header[5 : 5 + len(command.ints)] = torch.tensor(command.ints, dtype=torch.int64)
    _bcast(world, header)
    if text:
        _bcast(world, torch.frombuffer(bytearray(text), dtype=torch.uint8))
    for t in command.tensors:
        t = t.detach().to("cpu").contiguous()
        if t.dim() > MAX_DIMS:
            raise ValueError("command tensor has too many dimensions")
        meta = torch.zeros(2 + MAX_DIMS, dtype=torch.int64)
        meta[0], meta[1] = _DTYPES.index(t.dtype), t.dim()
        meta[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        _bcast(world, meta)
        _bcast(world, t)


def recv(world: World) -> Command:
    """Ranks > 0: the next command (blocks until rank 0 sends one)."""
    header = _bcast(world, torch.zeros(HEADER, dtype=torch.int64))
    magic, op, n_tensors, n_ints, n_text = (int(v) for v in header[:5])
    if magic != MAGIC:
        raise RuntimeError(f"bad command header {header.tolist()}")
    command = Command(Op(op), ints=[int(v) for v in header[5 : 5 + n_ints]])
    if n_text:
        raw = _bcast(world, torch.zeros(n_text, dtype=torch.uint8))
        command.text = bytes(raw.tolist()).decode("utf-8")
    for _ in range(n_tensors):
        meta = _bcast(world, torch.zeros(2 + MAX_DIMS, dtype=torch.int64))
        dtype, ndim = _DTYPES[int(meta[0])], int(meta[1])
        shape = [int(v) for v in meta[2 : 2 + ndim]]
        command.tensors.append(_bcast(world, torch.zeros(shape, dtype=dtype)))
    return command


def encode_pairs(pairs: Sequence[PairTokens]) -> list[torch.Tensor]:
    """(n, 3) lengths and the flat token ids of ``pairs`` (prompt, chosen, rejected each)."""
    lengths = torch.tensor(
        [[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs], dtype=torch.int64
    ).reshape(-1, 3)
    flat = [t for p in pairs for t in (*p.prompt, *p.chosen, *p.rejected)]
    return [lengths, torch.tensor(flat, dtype=torch.int64)]


def decode_pairs(lengths: torch.Tensor, flat: torch.Tensor) -> list[PairTokens]:
    ids = flat.tolist()
    out, at = [], 0
    for a, b, c in lengths.tolist():
        out.append(
            PairTokens(ids[at : at + a], ids[at + a : at + a + b], ids[at + a + b : at + a + b + c])
        )
        at += a + b + c
    return out


def heartbeat(world: World) -> None:
    """Rank 0's worker thread, every ``DPO_DIST_HEARTBEAT_S`` (between batches): every rank
    answers one agreement. A rank that died while no request ran fails it, so the service goes not-ready
    even when no launcher is left to notice."""
    send(world, Command(Op.HEARTBEAT))
    world.agree(True)
