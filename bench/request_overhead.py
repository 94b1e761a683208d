"""Where a request's time goes: client wall time, the server's own latency for it
(``dpo_request_latency_seconds``, admission to answer) and the in-process core, medians, HTTP
and gRPC interleaved; at 16 pairs x 256 tokens and for one short pair (small model).

    .venv/bin/python bench/request_overhead.py
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving
import workloads as W

from dpo_service.client import DpoClient
from dpo_service.settings import Settings

_SERIES = r'dpo_request_latency_seconds_{}\{{endpoint="[^"]*loss[^"]*",protocol="{}"\}} (\S+)'


def server_seconds(url: str, protocol: str) -> float:
    """Sum of the server's latency histogram for loss calls over ``protocol`` so far."""
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(_SERIES.format("sum", protocol), text))


def measure(cfg: object, wl: W.Workload, n: int, n_pairs: int | None) -> None:
    pairs = wl.make_pairs(cfg.vocab_size)  # type: ignore[attr-defined]
    pairs = pairs[:n_pairs] if n_pairs else pairs
    with tempfile.TemporaryDirectory() as tmp:
        W.build_model(cfg).save_pretrained(Path(tmp) / "model")  # type: ignore[arg-type]
        settings = Settings(model=str(Path(tmp) / "model"), enable_http=False, enable_grpc=False)
        core = statistics.median(serving.in_process_core(settings, pairs, n))
        with (
            tempfile.TemporaryDirectory() as logs,
            serving.ServerProcess(Path(tmp) / "model", Path(logs)) as server,
            DpoClient.http(server.url, timeout=600) as http,
            DpoClient.grpc(server.target, timeout=600) as grpc,
        ):
            body = serving._body_pairs(pairs)
            clients = {"http": http, "grpc": grpc}
            wall: dict[str, list[float]] = {k: [] for k in clients}
            srv: dict[str, list[float]] = {k: [] for k in clients}
            for client in clients.values():
                client.compute_loss(body)  # warm-up
            for _ in range(n):
                for name, client in clients.items():
                    before = server_seconds(server.url, name)
                    start = time.perf_counter()
                    client.compute_loss(body)
                    wall[name].append(time.perf_counter() - start)
                    srv[name].append(server_seconds(server.url, name) - before)
    print(f"\n{wl.title}: {len(pairs)} pair(s), median of {n}\n")
    print("| path | client wall (ms) | server latency (ms) | transport + client (ms) "
          "| server − in-process core (ms) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    print(f"| in-process core | {core * 1e3:.1f} | – | – | – |")
    for name in clients:
        w, s = statistics.median(wall[name]), statistics.median(srv[name])
        print(f"| {name} | {w * 1e3:.1f} | {s * 1e3:.1f} | {(w - s) * 1e3:.1f} "
              f"| {(s - core) * 1e3:.1f} |")  # fmt: skip


def main() -> None:
    measure(W.BENCH_MODEL, W.SERVE_WORKLOAD, 6, None)
    measure(W.SMALL_MODEL, W.SMALL_SERVE_WORKLOAD, 60, 1)


if __name__ == "__main__":
    main()
