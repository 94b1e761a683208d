"""End to end: the real server over HTTP and gRPC on loopback, and dynamic batching.

The server runs as ``python -m dpo_service serve`` in a subprocess (its own interpreter and
torch threads, as deployed), holding the benchmark model saved with ``save_pretrained``; the
clients (:class:`dpo_service.client.DpoClient`) run in this process. The in-process reference
is the same :class:`~dpo_service.engine.admission.Admission` (validation, tokenisation, engine, batching) driven
directly, without a transport.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from dpo_service.client import DpoClient
from dpo_service.engine.admission import make_admission
from dpo_service.schemas import LossRequest
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _body_pairs(pairs: list[PairTokens]) -> list[tuple[list[int], list[int], list[int]]]:
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


class ServerProcess:
    """``python -m dpo_service serve`` with ``DPO_*`` settings, HTTP and gRPC on loopback."""

    def __init__(self, model_dir: Path, log_dir: Path, **settings: Any) -> None:
        self.http_port, self.grpc_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
        values = {
            "host": "127.0.0.1",
            "port": self.http_port,
            "grpc_port": self.grpc_port,
            "model": str(model_dir),
            "log_level": "warning",
            "max_queue": 1024,
            "request_timeout_s": 600,
            **settings,
        }
        env.update(
            {
                f"DPO_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in values.items()
            }
        )
        self.log_path = log_dir / f"server-{self.http_port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dpo_service", "serve"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.target = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
                try:
                    if c.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout} s: {self.log_path.read_text()[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sequential(call: Callable[[], object], rounds: int) -> list[float]:
    """Seconds per call: one warm-up, then ``rounds`` calls."""
    call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def concurrent_burst(clients: list[DpoClient], pairs: list[PairTokens], rounds: int) -> list[float]:
    """Seconds per burst: client i sends pair i alone, all at once (threads); the burst ends
    when the last answer arrives. One warm-up burst."""
    times = []
    for r in range(rounds + 1):
        barrier = threading.Barrier(len(clients) + 1)
        errors: list[BaseException] = []

        def worker(
            client: DpoClient,
            pair: PairTokens,
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                client.compute_loss(_body_pairs([pair]))
            except BaseException as exc:  # reported after the burst
                errors.append(exc)

        threads = [
            threading.Thread(target=worker, args=(c, p))
            for c, p in zip(clients, pairs, strict=True)
        ]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        if r > 0:
            times.append(time.perf_counter() - start)
    return times


def in_process_core(settings: Settings, pairs: list[PairTokens], rounds: int) -> list[float]:
    """The service core without a transport: LossRequest → Admission.compute → LossResult."""
    core = make_admission(settings)
    request = LossRequest.model_validate(
        {
            "pairs": [
                {"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected}
                for p in pairs
            ]
        }
    )

    async def run() -> list[float]:
        await core.start()
        try:

            async def once() -> None:
                await core.compute(request, api_key=None)

            await once()
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                await once()
                times.append(time.perf_counter() - start)
            return times
        finally:
            await core.engine.drain(10)
            await core.engine.stop()

    return asyncio.run(run())


#: Prefix of the rows that time one 1-pair request at a time (latency, not throughput).
LATENCY = "latency: "


def run_serving(
    model_dir: Path,
    pairs: list[PairTokens],
    rounds: int,
    batching_off: bool = True,
    latency_samples: int = 0,
) -> dict[str, list[float]]:
    """Seconds per request (or burst) for every serving path, keyed by row name: one request
    with all ``pairs`` in process, over HTTP and over gRPC; then one client per pair, all at
    once, over HTTP and gRPC with dynamic batching on and (``batching_off``) HTTP with it off.
    ``latency_samples`` > 0: also ``latency_samples`` sequential 1-pair requests per protocol
    (rows prefixed :data:`LATENCY`, every sample kept for percentiles)."""
    out: dict[str, list[float]] = {}
    settings = Settings(model=str(model_dir), enable_http=False, enable_grpc=False)
    out["in-process core, one request"] = in_process_core(settings, pairs, rounds)
    if latency_samples:
        out[LATENCY + "in-process core"] = in_process_core(settings, pairs[:1], latency_samples)
    with tempfile.TemporaryDirectory() as logs, ServerProcess(model_dir, Path(logs)) as server:
        for proto, make in (("HTTP", _http_client(server)), ("gRPC", _grpc_client(server))):
            with make() as client:
                call = lambda c=client: c.compute_loss(_body_pairs(pairs))  # noqa: E731
                out[f"{proto}, one request"] = sequential(call, rounds)
                if latency_samples:
                    one = lambda c=client: c.compute_loss(_body_pairs(pairs[:1]))  # noqa: E731
                    out[LATENCY + proto] = sequential(one, latency_samples)
        out["HTTP, concurrent 1-pair clients, batching on"] = _burst(server, pairs, rounds)
        out["gRPC, concurrent 1-pair clients, batching on"] = _burst(
            server, pairs, rounds, _grpc_client(server)
        )
    if batching_off:
        with (
            tempfile.TemporaryDirectory() as logs,
            ServerProcess(model_dir, Path(logs), dynamic_batching=False) as server,
        ):
            out["HTTP, concurrent 1-pair clients, batching off"] = _burst(server, pairs, rounds)
    return out


def _http_client(server: ServerProcess) -> Callable[[], DpoClient]:
    return lambda: DpoClient.http(server.url, timeout=600)


def _grpc_client(server: ServerProcess) -> Callable[[], DpoClient]:
    return lambda: DpoClient.grpc(server.target, timeout=600)


def _burst(
    server: ServerProcess,
    pairs: list[PairTokens],
    rounds: int,
    make: Callable[[], DpoClient] | None = None,
) -> list[float]:
    """:func:`concurrent_burst` with one client per pair (HTTP unless ``make`` says)."""
    clients = [(make or _http_client(server))() for _ in pairs]
    try:
        return concurrent_burst(clients, pairs, rounds)
    finally:
        for c in clients:
            c.close()
