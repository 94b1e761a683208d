"""A real ``torchrun --nproc-per-node N -m dpo_service serve`` world for the issue-13 tests:
rank 0 serves HTTP and gRPC on loopback, the other ranks follow it (gloo on CPU, one thread
per rank)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from server_process import AUTH, ServerProcess, free_port

PAIRS = [  # mixed lengths: micro-batches of unequal shares
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome, of course."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Name a colour:", "chosen": " blue", "rejected": " the number seven"},
    {"prompt": "Say hi", "chosen": " hi!", "rejected": " no."},
    {"prompt": "A long prompt about rivers and the sea,", "chosen": " water", "rejected": " sand"},
]


WORLD_ENV: dict[str, Any] = {
    "keep_reference": "true",
    "max_batch_tokens": 64,
    "checkpoint_every": 1,
    "max_sessions": 2,
}


class TorchrunWorld(ServerProcess):
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m dpo_service serve``."""

    checkpoint_dir: Path | None = None  # set by start_world

    def __init__(self, log_path: Path, nproc: int, **env: Any) -> None:
        self.command = (
            "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "dpo_service", "serve",
        )  # fmt: skip
        self.grpc_port = free_port()
        super().__init__(
            log_path,
            enable_grpc="true",
            grpc_port=self.grpc_port,
            dist_timeout_s=env.pop("dist_timeout_s", 60),
            **env,
        )
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"

    def rank_pids(self) -> dict[int, int]:
        """The worker processes torchrun started, by their ``RANK``."""
        out: dict[int, int] = {}
        for child in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                for item in env:
                    if item.startswith(b"RANK="):
                        out[int(item[5:])] = int(pid)
        return out

    def close(self) -> None:
        """Kill the ranks too: a SIGKILLed torchrun leaves its workers running."""
        ranks = self.rank_pids() if self.proc.poll() is None else {}
        super().close()
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_world(
    tmp: Path, nproc: int, parallel: str, ckpt: Path, name: str, **env: Any
) -> TorchrunWorld:
    """A world of ``nproc`` ranks on ``ckpt`` (``WORLD_ENV`` plus ``env``), once it is ready."""
    world = TorchrunWorld(
        tmp / f"{name}.log", nproc, parallel=parallel, checkpoint_dir=str(ckpt),
        **{**WORLD_ENV, **env},
    )  # fmt: skip
    world.checkpoint_dir = ckpt
    world.wait_ready(180)
    return world


def loss(
    client: httpx.Client,
    pairs: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
    **body: Any,
) -> dict[str, Any]:
    response = client.post("/dpo/loss", json={"pairs": pairs, **body}, headers=headers or AUTH)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_gone(world: TorchrunWorld, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = world.proc.poll()
        if code is not None:
            return code
        time.sleep(0.1)
    raise AssertionError(f"torchrun still running after {timeout} s:\n{world.log()}")


__all__ = ["PAIRS", "WORLD_ENV", "TorchrunWorld", "loss", "start_world", "wait_gone"]
