"""Load test: N concurrent clients mixing loss and train calls over REST and gRPC.

    .venv/bin/python bench/load.py --clients 32 --seconds 30

Starts a real server in this process (tiny built-in model unless --model says otherwise),
runs the clients against it on loopback for a bounded time and number of calls, then prints
p50/p99 latency per protocol and kind, the codes seen, the server's peak RSS, and checks that
the final model version equals the number of acknowledged train calls (no lost or doubled
steps). Exit status 1 when a check fails. The test suite runs a short version of it.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dpo_service"))

from conftest import API_KEY, running_server
from dpo_service.client import DpoClient, DpoClientError, RetryPolicy

PROMPTS = ["What is 2+2?", "Name a colour.", "Say something kind.", "Translate 'cat' to French."]


@dataclass
class LoadResult:
    calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    acknowledged_train: set[int] = field(default_factory=set)
    duplicate_versions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, key: str, code: str, seconds: float, new_version: int | None) -> None:
        with self.lock:
            self.calls += 1
            self.codes[code] += 1
            self.latencies.setdefault(key, []).append(seconds)
            if new_version is not None:
                if new_version in self.acknowledged_train:
                    self.duplicate_versions += 1
                self.acknowledged_train.add(new_version)


def _pairs(rng: random.Random) -> list[tuple[str, str, str]]:
    return [
        (rng.choice(PROMPTS), " " + "yes " * rng.randint(1, 8), " " + "no " * rng.randint(1, 8))
        for _ in range(rng.randint(1, 4))
    ]


def client_loop(
    idx: int, make: Any, result: LoadResult, stop_at: float, max_calls: int, train_every: int
) -> None:
    rng = random.Random(idx)
    protocol = "grpc" if idx % 2 else "http"
    # no retries: every refusal is counted as what it is
    with make(protocol) as client:
        for n in range(max_calls):
            if time.monotonic() >= stop_at:
                return
            train = (n + idx) % train_every == 0
            key = f"{protocol}/{'train' if train else 'loss'}"
            started = time.monotonic()
            try:
                out = client.compute_loss(_pairs(rng), train=train, deadline_s=60)
                code = "ok"
                new_version = out.new_model_version if train else None
            except DpoClientError as err:
                code, new_version = err.code.value, None
            result.record(key, code, time.monotonic() - started, new_version)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_load(
    clients: int, seconds: float, max_calls: int, train_every: int = 4, **server: Any
) -> tuple[LoadResult, int, int]:
    """Run the load; returns (result, start version, final version)."""
    with running_server(**server) as srv:
        start = srv.version

        def make(protocol: str) -> DpoClient:
            policy = RetryPolicy(max_attempts=1)
            if protocol == "grpc":
                return DpoClient.grpc(srv.grpc_target, api_key=API_KEY, retry=policy)
            return DpoClient.http(srv.http_url, api_key=API_KEY, retry=policy)

        result = LoadResult()
        stop_at = time.monotonic() + seconds
        threads = [
            threading.Thread(
                target=client_loop, args=(i, make, result, stop_at, max_calls, train_every)
            )
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 120)
        final = srv.version
    return result, start, final


def report(result: LoadResult, start: int, final: int) -> list[str]:
    lines = [
        "| calls | kind | p50 ms | p99 ms |",
        "| --- | --- | --- | --- |",
    ]
    for key, values in sorted(result.latencies.items()):
        lines.append(
            f"| {len(values)} | {key} | {percentile(values, 0.5) * 1e3:.1f} | "
            f"{percentile(values, 0.99) * 1e3:.1f} |"
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append("")
    lines.append(f"codes: {dict(result.codes)}")
    lines.append(
        f"train acknowledged: {len(result.acknowledged_train)}, version {start} -> {final}, "
        f"duplicates: {result.duplicate_versions}; peak RSS of the process: {peak_mib:.0f} MiB"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-calls", type=int, default=10_000, help="per client")
    args = parser.parse_args()
    result, start, final = run_load(args.clients, args.seconds, args.max_calls, max_queue=256)
    print("\n".join(report(result, start, final)))
    ok = final - start == len(result.acknowledged_train) and result.duplicate_versions == 0
    bad = {c for c in result.codes if c not in ("ok", "overloaded", "unavailable")}
    return 0 if ok and not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
