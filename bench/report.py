"""The benchmark's markdown: serving tables (pairs/s and short-request latency percentiles)
and the targets of the performance issues, met or not (``bench/run.py`` measures, this
module reports). Row names are shared with ``run.py``, which looks rows up by them."""

from __future__ import annotations

import math

import serving

ENGINE_LOSS = "engine loss-only (auto layout, bucketing, padding skipped, chunked head)"
ENGINE_TRAIN = "engine train step (shared_prefix, padding skipped, head auto → stored, AdamW)"
PREV_LOSS = "engine loss-only, padded rows (previous default)"
PREV_TRAIN = "engine train step, padded rows, chunked head (previous default)"
A_LOSS = "A: textbook, 2 passes, full log-softmax"
A_TRAIN = "A: textbook train step (2 passes, full log-softmax, AdamW)"


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def serving_table(times: dict[str, list[float]], n_pairs: int, title: str) -> tuple[str, dict]:
    """Pairs/s per serving path (best round) with its ratio to the path it is judged against,
    then, when measured, the latency of one 1-pair request (p50 / p99 of every sample)."""
    latency = {k[len(serving.LATENCY) :]: v for k, v in times.items() if k.startswith("latency")}
    rate = {k: n_pairs / min(v) for k, v in times.items() if not k.startswith("latency")}
    ref = {
        "HTTP, one request": "in-process core, one request",
        "gRPC, one request": "in-process core, one request",
        "HTTP, concurrent 1-pair clients, batching on": "HTTP, one request",
        "gRPC, concurrent 1-pair clients, batching on": "gRPC, one request",
        "HTTP, concurrent 1-pair clients, batching off": "HTTP, concurrent 1-pair clients, "
        "batching on",
    }
    lines = [
        f"### serving: {title}",
        "",
        "| path | pairs/s | relative to | ratio |",
        "|---|---:|---|---:|",
    ]
    for name, r in rate.items():
        base = ref.get(name)
        ratio = f"{r / rate[base]:.2f}" if base in rate else "–"
        lines.append(f"| {name} | {fmt(r, 2)} | {base or '–'} | {ratio} |")
    if latency:
        lines += [
            "",
            "One 1-pair request at a time (a client waiting for each answer):",
            "",
            "| path | requests | p50 (ms) | p99 (ms) | p50 ÷ in-process |",
            "|---|---:|---:|---:|---:|",
        ]
        p50 = {k: _percentile(v, 0.5) for k, v in latency.items()}
        base50 = p50.get("in-process core")
        for name, samples in latency.items():
            ratio = f"{p50[name] / base50:.2f}" if base50 else "–"
            lines.append(
                f"| {name} | {len(samples)} | {p50[name] * 1e3:.2f} | "
                f"{_percentile(samples, 0.99) * 1e3:.2f} | {ratio} |"
            )
    return "\n".join(lines), rate


def _percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least ``q`` of them at or below."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def targets(
    stats: dict[str, dict[str, dict[str, float]]],
    rate: dict[str, float],
    small: dict[str, float] | None = None,
) -> str:
    """The goals of the issues, met or not; ``rate`` is the 16 × 256 serving shape's pairs/s
    by row, ``small`` the short-pair (32 tokens) shape's."""
    small = small or {}
    eng_l, eng_t, a_l = ENGINE_LOSS, ENGINE_TRAIN, A_LOSS
    checks: list[tuple[str, float | None, float, str]] = []

    def get(wl: str, row: str, key: str) -> float | None:
        return stats.get(wl, {}).get(row, {}).get(key)

    checks.append(("useful MFU, loss-only, TRL shape", get("trl", eng_l, "mfu"), 0.70, "≥"))
    checks.append(("useful MFU, train step, TRL shape", get("trl", eng_t, "mfu"), 0.55, "≥"))
    checks.append(("loss-only × A, long prompt", get("long_prompt", eng_l, "speedup"), 2.0, "≥"))
    slowest = [get(w, eng_l, "speedup") for w in stats]
    known = [s for s in slowest if s is not None]
    checks.append(("loss-only × A, slowest workload", min(known) if known else None, 1.0, "≥"))
    checks.append(("train step × A, long prompt", get("long_prompt", eng_t, "speedup"), 1.3, "≥"))
    mem_e, mem_a = get("vocab128k", eng_l, "step_mib"), get("vocab128k", a_l, "step_mib")
    mem = mem_e / mem_a if mem_e is not None and mem_a and mem_a == mem_a else None
    checks.append(("log-prob step memory ÷ A, vocab 128k", mem, 1 / 3, "≤"))

    def ratio(a: str, b: str) -> float | None:
        return rate[a] / rate[b] if a in rate and b in rate else None

    conc, one = "HTTP, concurrent 1-pair clients, batching on", "HTTP, one request"
    off, inproc = "HTTP, concurrent 1-pair clients, batching off", "in-process core, one request"
    gconc, gone = "gRPC, concurrent 1-pair clients, batching on", "gRPC, one request"
    checks.append(("16 single-pair clients ÷ one 16-pair request", ratio(conc, one), 0.7, "≥"))
    checks.append(("16 single-pair clients, batching on ÷ off", ratio(conc, off), 3.0, "≥"))
    checks.append(("HTTP ÷ in-process core", ratio(one, inproc), 0.85, "≥"))
    checks.append(("gRPC ÷ in-process core (issue 15: 16 × 256)", ratio(gone, inproc), 0.95, "≥"))
    for proto, c, o in (("HTTP", conc, one), ("gRPC", gconc, gone)):
        value = small.get(c, 0) / small[o] if small.get(o) else None
        checks.append((f"16 short 1-pair {proto} clients ÷ one 16-pair request", value, 0.9, "≥"))
    lines = ["### targets", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for name, value, goal, op in checks:
        if value is None or value != value:
            lines.append(f"| {name} | not run | {op} {goal:.2f} | – |")
            continue
        ok = value >= goal if op == "≥" else value <= goal
        lines.append(f"| {name} | {value:.2f} | {op} {goal:.2f} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)
