"""Distributed benchmark (issue 13, "Past one device"): the real service under torchrun at world
size 1 and 2, per parallel mode, timed over HTTP.

    .venv/bin/python bench/distributed.py               # make bench-distributed
    .venv/bin/python bench/distributed.py --smoke       # tiny model, proves the harness
    .venv/bin/python bench/distributed.py --worlds 1,2 --modes ddp,fsdp --rounds 5 --json

For each world size W and parallel mode (``DPO_PARALLEL``), one server (world size 1 once: a
world of one is the ordinary single process, whatever ``DPO_PARALLEL`` says):
``python -m torch.distributed.run --standalone --nproc-per-node W -m dpo_service serve`` on
free loopback ports, ``OMP_NUM_THREADS=1`` (one thread per rank), the built-in model (d 256,
4 layers by default), ``DPO_KEEP_REFERENCE=true`` (``reference: "frozen"``), a fresh checkpoint
directory. Once ``GET /health/ready`` answers 200, one client times, one request at a time,
(a) loss-only requests and (b) train requests (one optimizer step each) of ``--pairs`` token
pairs (prompt 64 + responses 2 × 48 tokens): ``--warmup`` untimed, then ``--rounds`` timed;
the median seconds per request is reported, and world W ÷ world 1 per mode. Then SIGTERM goes
to rank 0 (as ``docker stop`` does to a one-process service): the server must drain, write its
final checkpoint and exit 0, torchrun with it. Every wait has a timeout, and the process group
is killed at the end whatever happened.

On CPU (gloo) world 2 is not faster than world 1 on a 2-core machine: the ratio is the cost of
the collectives per request, which a GPU cluster pays too (over NCCL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

API_KEY = "bench-distributed-" + "k" * 32  # 32+ characters, not a placeholder: bench only
MODEL = {"builtin_d_model": 256, "builtin_layers": 4, "builtin_heads": 8, "builtin_kv_heads": 2}
SMOKE_MODEL = {
    "builtin_d_model": 64, "builtin_layers": 2, "builtin_heads": 4, "builtin_kv_heads": 2,
    "builtin_max_seq_len": 256,
}  # fmt: skip
SHAPE = (64, 48)  # prompt tokens, tokens per response
SMOKE_SHAPE = (8, 6)
WORKLOADS = ("loss-only", "train")


@dataclass
class Run:
    """One server: a parallel mode at one world size."""

    mode: str
    world: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    logp_before: float | None = None  # summed chosen log-prob of a probe, before training
    logp_after: float | None = None  # the same probe after the train requests
    parameters: int = 0
    versions: tuple[int, int] | None = None  # model_version before / after the train requests
    exit_code: int | None = None
    checkpoint_files: int = 0
    log_tail: str = ""

    def median(self, workload: str) -> float:
        return statistics.median(self.seconds[workload])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_requests(n: int, pairs: int, shape: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """``n`` request bodies of ``pairs`` token-id pairs (ids below 256: byte tokens)."""
    rng = random.Random(seed)
    prompt, response = shape

    def ids(k: int) -> list[int]:
        return [rng.randrange(256) for _ in range(k)]

    return [
        {"pairs": [{"prompt_ids": ids(prompt), "chosen_ids": ids(response),
                    "rejected_ids": ids(response)} for _ in range(pairs)],
         "reference": "frozen"}
        for _ in range(n)
    ]  # fmt: skip


class Server:
    """The service under torchrun, in its own process group, logging to a file."""

    def __init__(
        self,
        world: int,
        mode: str,
        model: dict[str, int],
        workdir: Path,
        lr: float,
        threads: int = 1,
    ) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoints = workdir / f"checkpoints-{mode}-w{world}"
        self.log_path = workdir / f"server-{mode}-w{world}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
        settings = {
            "DPO_HOST": "127.0.0.1",
            "DPO_API_KEY": API_KEY,
            "DPO_LR": str(lr),
            "DPO_KEEP_REFERENCE": "true",
            "DPO_REFERENCE_CACHE": "off",  # every request computes its reference pass
            "DPO_CHECKPOINT_DIR": str(self.checkpoints),
            "DPO_PARALLEL": mode,
            "DPO_LOG_LEVEL": "warning",
            **{f"DPO_{k.upper()}": str(v) for k, v in model.items()},
        }
        env = {**base, **settings, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(world), "-m", "dpo_service", "serve",
            "--port", str(self.port), "--grpc-port", str(self.grpc_port),
        ]  # fmt: skip
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text("utf-8", errors="replace")[-chars:]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode} before ready")
                try:
                    if client.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"server not ready within {timeout:.0f} s")

    def rank0_pid(self) -> int | None:
        """The worker with ``RANK=0`` among torchrun's descendants (Linux ``/proc``)."""
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                fields = stat.read_text().rsplit(")", 1)[1].split()
                parents[int(stat.parent.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
        family, grew = {self.proc.pid}, True
        while grew:
            grew = False
            for pid, ppid in parents.items():
                if ppid in family and pid not in family:
                    family.add(pid)
                    grew = True
        for pid in sorted(family - {self.proc.pid}):
            try:
                if b"RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return pid
            except OSError:
                continue
        return None

    def stop(self, timeout: float) -> int:
        """SIGTERM to rank 0; torchrun's exit code."""
        pid = self.rank0_pid()
        if pid is None:
            raise RuntimeError("rank 0 not found among torchrun's processes")
        os.kill(pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any rank left behind, whatever happened
        try:
            self.proc.wait(30)
        finally:
            self._log.close()


def _post(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post("/dpo/loss", json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"POST /dpo/loss: {response.status_code} {response.text[:500]}")
    out: dict[str, Any] = response.json()
    return elapsed, out


def measure(run: Run, server: Server, args: argparse.Namespace) -> None:
    """Warm-up then timed loss-only requests, then the same for train requests."""
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    n = args.warmup + args.rounds
    headers = {"Authorization": f"Bearer {API_KEY}"}
    probe = make_requests(1, args.pairs, shape, seed=0)[0]
    with httpx.Client(base_url=server.url, headers=headers, timeout=args.request_timeout) as c:
        info = c.get("/v1/model").json()
        before, run.parameters = int(info["model_version"]), int(info["parameters"])
        run.logp_before = sum(_post(c, probe)[1]["chosen_logps"])
        for workload, seed in (("loss-only", 1), ("train", 2)):
            times = []
            for i, body in enumerate(make_requests(n, args.pairs, shape, seed)):
                if workload == "train":
                    body = {**body, "train": True}
                elapsed, out = _post(c, body)
                if workload == "train" and out.get("trained") is not True:
                    raise RuntimeError(f"train request not applied: {out}")
                if i >= args.warmup:
                    times.append(elapsed)
            run.seconds[workload] = times
        run.logp_after = sum(_post(c, probe)[1]["chosen_logps"])
        after = int(c.get("/v1/model").json()["model_version"])
    run.versions = (before, after)
    if after - before != n:
        raise RuntimeError(f"model_version went {before} → {after} over {n} train requests")


def one_run(mode: str, world: int, args: argparse.Namespace, workdir: Path) -> Run:
    run = Run(mode, world)
    threads = args.baseline_threads if world == 1 else 1
    server = Server(world, mode, SMOKE_MODEL if args.smoke else MODEL, workdir, args.lr, threads)
    try:
        server.wait_ready(args.ready_timeout)
        measure(run, server, args)
        run.exit_code = server.stop(args.stop_timeout)
        if server.checkpoints.is_dir():
            run.checkpoint_files = sum(1 for p in server.checkpoints.rglob("*") if p.is_file())
    finally:
        server.close()
        run.log_tail = server.log_tail()
    return run


def table(runs: list[Run], worlds: list[int], modes: list[str], pairs: int) -> str:
    """Rows: mode × workload; columns: the median seconds per request at each world size, then
    each world size ÷ the first (world size 1, measured once, is every mode's)."""
    by = {(r.mode, r.world): r for r in runs}
    by.update({(m, 1): r for r in runs if r.world == 1 for m in modes})  # one run serves all
    base = worlds[0]
    head = [f"world {w} (s)" for w in worlds] + [f"world {w} ÷ world {base}" for w in worlds[1:]]
    lines = [
        f"| mode | workload ({pairs} pairs per request) | " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * len(head),
    ]
    for mode in modes:
        for workload in WORKLOADS:
            medians = [by[(mode, w)].median(workload) for w in worlds]
            cells = [f"{m:.4f}" for m in medians] + [f"{m / medians[0]:.2f}" for m in medians[1:]]
            lines.append(f"| {mode} | {workload} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(runs: list[Run]) -> str:
    """The probe's summed chosen log-prob before and after the train requests, per run: the same
    requests give the same numbers at every world size (up to reduction order)."""
    return "; ".join(
        f"{r.mode} world {r.world}: {r.logp_before:.4f} → {r.logp_after:.4f}" for r in runs
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=_ints, default=[1, 2], help="world sizes, e.g. 1,2")
    parser.add_argument("--modes", default="ddp,fsdp", help="DPO_PARALLEL values, e.g. ddp,fsdp")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per request")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per workload")
    parser.add_argument("--rounds", type=int, default=5, help="timed requests per workload")
    parser.add_argument("--smoke", action="store_true", help="tiny model and pairs")
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="DPO_LR: large enough that the probe moves"
    )
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=1,
        help="threads of the world-1 run (default 1: one thread per rank everywhere; 2 on a "
        "2-core machine: the same cores as world 2)",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--stop-timeout", type=float, default=120.0)
    return parser


def collect(args: argparse.Namespace, modes: list[str], workdir: Path) -> list[Run]:
    """One server per (mode, world size); world size 1 once (``auto``): a world of one is the
    ordinary single process, with no process group for ``DPO_PARALLEL`` to act on."""
    runs: list[Run] = []
    for world in args.worlds:
        for mode in modes if world > 1 else ["auto"]:
            try:
                runs.append(one_run(mode, world, args, workdir))
            except (RuntimeError, httpx.HTTPError, subprocess.TimeoutExpired) as exc:
                log = workdir / f"server-{mode}-w{world}.log"
                tail = log.read_text("utf-8", errors="replace")[-4000:] if log.exists() else ""
                raise RuntimeError(f"{mode}, world {world}: {exc}\n{tail}") from exc
    return runs


def report(runs: list[Run], args: argparse.Namespace, modes: list[str]) -> None:
    model = SMOKE_MODEL if args.smoke else MODEL
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    print(
        f"built-in model d {model['builtin_d_model']}, {model['builtin_layers']} layers "
        f"({runs[0].parameters / 1e6:.1f}M parameters), float32, "
        f"CPU (gloo), OMP_NUM_THREADS=1 per rank (world 1: {args.baseline_threads}); {args.pairs} pairs of prompt {shape[0]} + "
        f"2 × {shape[1]} tokens per request; median of {args.rounds} after {args.warmup} "
        "warm-up, one request at a time over HTTP\n"
    )
    print(table(runs, args.worlds, modes, args.pairs))
    print("\nprobe (summed chosen log-prob, before → after the train requests): " + agreement(runs))
    print("SIGTERM to rank 0, exit status: " + ", ".join(
        f"{r.mode} world {r.world}: {r.exit_code} ({r.checkpoint_files} checkpoint files)"
        for r in runs))  # fmt: skip
    if args.json:
        print(json.dumps({"runs": [
            {"mode": r.mode, "world": r.world, "exit_code": r.exit_code,
             "logp_before": r.logp_before, "logp_after": r.logp_after, "versions": r.versions,
             "checkpoint_files": r.checkpoint_files, "parameters": r.parameters,
             **{f"{w}_median_s": r.median(w) for w in WORKLOADS},
             **{f"{w}_seconds": r.seconds[w] for w in WORKLOADS}}
            for r in runs
        ]}))  # fmt: skip


def main() -> int:
    args = _parser().parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.rounds < 1 or args.warmup < 0 or not args.worlds or not modes:
        raise SystemExit("need --rounds ≥ 1, --warmup ≥ 0, a world size and a mode")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
            runs = collect(args, modes, Path(tmp))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    report(runs, args, modes)
    bad = [r for r in runs if r.exit_code != 0]
    for r in bad:
        print(f"{r.mode}, world {r.world}: exit {r.exit_code} after SIGTERM\n{r.log_tail}",
              file=sys.stderr)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
