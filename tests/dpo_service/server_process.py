"""A real ``python -m dpo_service serve`` subprocess for lifecycle and durability tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import API_KEY, SMALL_MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``dpo-service serve`` (HTTP only, tiny built-in model) configured by ``DPO_*`` env."""

    command: tuple[str, ...] = ("-m", "dpo_service", "serve")  # after the interpreter

    def __init__(self, log_path: Path, **env: Any) -> None:
        self.port = free_port()
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
        settings = {
            "DPO_HOST": "127.0.0.1",
            "DPO_PORT": str(self.port),
            "DPO_ENABLE_GRPC": "false",
            "DPO_API_KEY": API_KEY,
            "DPO_LR": "1e-3",
            "DPO_LOG_LEVEL": "info",
            **{f"DPO_{k.upper()}": str(v) for k, v in SMALL_MODEL.items()},
            **{f"DPO_{k.upper()}": str(v) for k, v in env.items()},
        }
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, *self.command],
            env={**base, **settings, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self.client(timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if c.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"server not ready within {timeout} s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()
