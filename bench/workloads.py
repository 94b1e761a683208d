"""Models, workloads, FLOP accounting, timing and machine facts shared by the benchmark.

Useful FLOPs (what the loss needs, the same count for every path of a workload):

    forward = Σ_pairs 2·P_layers·(prompt + chosen + rejected)        decoder layers, prompt once
            + Σ_pairs 2·d_model·V·(chosen + rejected)               LM head, response positions
            + Σ_pairs n_layers·4·d_model·A                          causal attention (QKᵀ and AV)
    A       = p(p+1)/2 + c·p + c(c+1)/2 + r·p + r(r+1)/2           attended (query, key) pairs
    train   = 3 × forward                                          (backward ≈ 2 × forward)

``P_layers`` counts the decoder-layer parameters (embedding lookups are free, the LM head is
counted per response position). MFU = useful FLOP/s ÷ the machine's measured fp32 matmul peak.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from modern_llm.alignment.logprobs import PairTokens
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM

#: The TRL comparison model: Llama-style, d_model 512, 8 layers, 8 heads, 8 KV heads (MHA),
#: vocab 32000, untied LM head: 58.5M parameters.
BENCH_MODEL = ModernDecoderConfig(
    vocab_size=32000,
    d_model=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=8,
    max_seq_len=2048,
    tie_embeddings=False,
    seed=0,
)
SMOKE_MODEL = ModernDecoderConfig(
    vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, seed=0
)


@dataclass(frozen=True)
class Workload:
    """A batch shape: ``pairs`` pairs whose lengths are drawn uniformly from the ranges."""

    name: str
    title: str
    pairs: int
    prompt: tuple[int, int]
    response: tuple[int, int]
    vocab: int | None = None  # None: the model's

    def config(self, base: ModernDecoderConfig) -> ModernDecoderConfig:
        return base if self.vocab is None else replace(base, vocab_size=self.vocab)

    def make_pairs(self, vocab: int, seed: int = 0) -> list[PairTokens]:
        rng = random.Random(seed)

        def ids(bounds: tuple[int, int]) -> list[int]:
            return [rng.randrange(vocab) for _ in range(rng.randint(*bounds))]

        return [
            PairTokens(ids(self.prompt), ids(self.response), ids(self.response))
            for _ in range(self.pairs)
        ]


WORKLOADS = {
    w.name: w
    for w in (
        Workload("trl", "TRL shape: prompt 130-170, responses 120-160", 8, (130, 170), (120, 160)),
        Workload("short_prompt", "short prompt 32 / long responses 256", 8, (32, 32), (256, 256)),
        Workload("long_prompt", "long prompt 512 / short responses 64", 8, (512, 512), (64, 64)),
        Workload(
            "mixed", "mixed lengths: prompt 16-384, responses 16-192", 16, (16, 384), (16, 192)
        ),
        Workload(
            "vocab128k",
            "vocabulary 128k (memory): prompt 128, responses 128",
            4,
            (128, 128),
            (128, 128),
            vocab=128_000,
        ),
    )
}
SMOKE_WORKLOADS = {
    "trl": Workload("trl", "smoke: prompt 6-12, responses 4-10", 3, (6, 12), (4, 10)),
    "vocab128k": Workload("vocab128k", "smoke: larger vocabulary", 2, (8, 8), (8, 8), vocab=4096),
}
#: The serving shape: 16 pairs × 256 tokens (prompt 128, chosen 64, rejected 64).
SERVE_WORKLOAD = Workload(
    "serve", "16 pairs × 256 tokens (prompt 128 + 64 + 64)", 16, (128, 128), (64, 64)
)
SMOKE_SERVE_WORKLOAD = Workload("serve", "smoke serving", 4, (8, 8), (4, 4))
#: An overhead-bound serving shape: the service's default built-in model size (d_model 256,
#: 4 layers, GQA 8/2) with a 32k vocabulary, 16 pairs × 32 tokens.
SMALL_MODEL = ModernDecoderConfig(
    vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=1024, seed=0
)
SMALL_SERVE_WORKLOAD = Workload(
    "serve_small", "small model (d256, 4 layers), 16 pairs × 32 tokens (16 + 8 + 8)", 16,
    (16, 16), (8, 8),
)  # fmt: skip


def build_model(cfg: ModernDecoderConfig) -> ModernDecoderLM:
    return ModernDecoderLM(cfg)


def layer_params(model: ModernDecoderLM) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))


def useful_flops(cfg: ModernDecoderConfig, n_layer_params: int, pairs: list[PairTokens]) -> float:
    """Forward FLOPs the loss needs (see the module docstring); ×3 for a training step."""
    total = 0.0
    for p in pairs:
        lp, lc, lr = len(p.prompt), len(p.chosen), len(p.rejected)
        attended = lp * (lp + 1) / 2 + lc * lp + lc * (lc + 1) / 2 + lr * lp + lr * (lr + 1) / 2
        total += 2 * n_layer_params * (lp + lc + lr)
        total += 2 * cfg.d_model * cfg.vocab_size * (lc + lr)
        total += cfg.n_layers * 4 * cfg.d_model * attended
    return total


def tokens(pairs: list[PairTokens]) -> int:
    """Distinct tokens of a batch (prompt once)."""
    return sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def best_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """One warm-up call each, then ``rounds`` interleaved rounds (each round starts one path
    later, so no path always follows the same neighbour); seconds per call."""
    for fn in fns.values():
        fn()
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - start)
    return out


def matmul_peak(quick: bool) -> tuple[float, str]:
    """Best fp32 GFLOP/s of large square matmuls (2 FLOPs per multiply-add)."""
    best, where = 0.0, ""
    sizes = (1024,) if quick else (2048, 3072, 4096)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)
        for _ in range(3 if quick else 6):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            rate = 2 * n**3 / (time.perf_counter() - start) / 1e9
            if rate > best:
                best, where = rate, f"{n}×{n} fp32 matmul"
    return best, where


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
    }


def summary(values: list[float]) -> tuple[float, float]:
    """(best, median) of a list of seconds."""
    return min(values), statistics.median(values)
