"""Hugging Face vs built-in: the same Llama shapes, served with ``hf:`` and as the built-in model.

    .venv/bin/python bench/hf.py                       # 4 workloads, 3 rounds (make bench-hf)
    .venv/bin/python bench/hf.py --quick               # 1 round
    .venv/bin/python bench/hf.py --workloads trl,mixed --kv-heads 4 --rounds 5
    .venv/bin/python bench/hf.py --smoke               # tiny model, seconds
    .venv/bin/python bench/hf.py --profile trl         # torch.profiler op table per path

The built-in model is :data:`workloads.BENCH_MODEL` with grouped-query attention (``--kv-heads``,
default 2: 8 query heads share 2 KV heads). The HF model is a ``transformers``
``LlamaForCausalLM`` with the same shapes (hidden 512, 8 layers, 8 heads, the same KV heads,
vocabulary 32000, untied head, intermediate size = the built-in SwiGLU width, RMSNorm eps and
RoPE theta), given **the built-in model's weights**, saved with a word-level tokenizer to a
temporary directory and loaded through the service's loader (``load_bundle("hf:...")``), so the
load-time probes decide its layouts as they would in production. Both models compute the same
function (the script prints the largest log-prob difference), so every row compares equal work.

Per workload, in one run, interleaved rounds after a warm-up call each, best of the rounds
(:func:`workloads.best_times`; the machine may be shared):

- ``loss-only``: the engine's loss-only path, :meth:`paths.Harness.loss`
  (``forward_logps`` under ``inference_mode`` with the engine's default settings);
- ``train step``: the engine's train step, :meth:`paths.Harness.train` (``run_train_step``);
- ``…, hf previous default``: the same on a second copy of the HF model switched to the adapter's
  stock paths (``HFCausalLM.use_stock_paths``: ``transformers``' own RMSNorm modules and no
  prefix KV cache, so loss-only runs ``shared_prefix``), i.e. the HF default before this work,
  beside the same built-in figure.

All three models train on the same pairs with the same settings from the same weights, so they
follow the same trajectory.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paths
import torch
import workloads as W

from dpo_service.engine.forward import forward_logps, strategy_for
from dpo_service.engine.train_state import TrainState
from dpo_service.models.bundle import ModelBundle
from dpo_service.models.loader import builtin_config, load_bundle
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens, resolve_strategy
from modern_llm.models.transformer import ModernDecoderConfig, ModernDecoderLM

DEFAULT_WORKLOADS = ("trl", "short_prompt", "long_prompt", "mixed")
TARGET = 0.9
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


class BundleHarness(paths.Harness):
    """:class:`paths.Harness` around a loaded bundle (here the ``hf:`` one)."""

    def __init__(self, bundle: ModelBundle, **overrides: Any) -> None:
        self.settings = Settings(**overrides)
        self.model = bundle.model.eval()
        self.state = TrainState.create(bundle, self.settings)


# ------------------------------------------------------------------------------ the HF twin


def llama_config(cfg: ModernDecoderConfig) -> Any:
    """A ``transformers.LlamaConfig`` with the built-in config's shapes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def llama_state_dict(model: ModernDecoderLM) -> dict[str, torch.Tensor]:
    """The built-in model's weights under ``LlamaForCausalLM``'s parameter names."""
    rename = {"attn": "self_attn", "attn_norm": "input_layernorm"}
    rename["mlp_norm"] = "post_attention_layernorm"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "layers":
            parts = ["model", *parts[:2], *(rename.get(p, p) for p in parts[2:])]
        elif parts[0] != "lm_head":
            parts = ["model", *parts]
        out[".".join(parts)] = tensor
    if model.lm_head is None:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer with ``vocab_size`` tokens (the pairs are token ids anyway)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *(f"w{i}" for i in range(len(SPECIALS), vocab_size))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_hf_twin(model: ModernDecoderLM, out: Path) -> bool:
    """Save a ``LlamaForCausalLM`` of ``model``'s shapes to ``out``; True when it also got
    ``model``'s weights (False: the built-in parameter names no longer map, random init)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config(model.config))
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    shared = not missing and not unexpected
    if not shared:
        print(f"  weights not shared: missing {missing[:3]}, unexpected {unexpected[:3]}",
              file=sys.stderr)  # fmt: skip
        hf = LlamaForCausalLM(llama_config(model.config))
    hf.save_pretrained(out)
    word_tokenizer(model.config.vocab_size).save_pretrained(out)
    return shared


def load_hf(path: Path) -> ModelBundle:
    tiny = builtin_config(d_model=32, layers=1, heads=2, kv_heads=1, max_seq_len=64, seed=0)
    return load_bundle(f"hf:{path}", device=torch.device("cpu"), dtype=torch.float32, builtin=tiny)


# ------------------------------------------------------------------------------ measuring


def layout(h: paths.Harness, grad: bool) -> str:
    """The layout the engine runs for this model (``auto`` resolved as ``pair_logps`` does)."""
    return resolve_strategy(h.model, strategy_for(h.settings, h.state.bundle), grad).value


def max_logp_diff(a: paths.Harness, b: paths.Harness, pairs: list[PairTokens]) -> float:
    with torch.inference_mode():
        x = forward_logps(a.model, pairs, a.settings, a.state.bundle)
        y = forward_logps(b.model, pairs, b.settings, b.state.bundle)
    return float(max((x.chosen - y.chosen).abs().max(), (x.rejected - y.rejected).abs().max()))


def setup(wl: W.Workload, cfg: ModernDecoderConfig) -> tuple[dict[str, Any], Any, float]:
    """The three harnesses (built-in, HF default, HF previous default), the pairs and the
    largest log-prob difference between the models."""
    cfg = wl.config(cfg)
    builtin = W.build_model(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        shared = save_hf_twin(builtin, Path(tmp))
        bundle, stock = load_hf(Path(tmp)), load_hf(Path(tmp))
    stock.model.use_stock_paths()  # the HF default before this work, measured beside it
    hb, hh, hp = paths.Harness(builtin), BundleHarness(bundle), BundleHarness(stock)
    pairs = wl.make_pairs(cfg.vocab_size)
    params = (builtin.num_parameters(), sum(p.numel() for p in bundle.model.parameters()))
    diff = max(max_logp_diff(hb, hh, pairs), max_logp_diff(hb, hp, pairs))
    print(f"  {wl.name}: parameters builtin {params[0]:,} / hf {params[1]:,}; weights shared: "
          f"{shared}; fused norms {len(bundle.model.stock_modules)}; "
          f"max |Δ log-prob| {diff:.2e}", file=sys.stderr, flush=True)  # fmt: skip
    return {"bi": hb, "hf": hh, "prev": hp}, pairs, diff


def path_fns(harness: dict[str, Any], pairs: Any) -> dict[str, Callable[[], object]]:
    """``"<model> <loss|train>"`` → one call; each HF path right after the built-in one."""
    fns: dict[str, Callable[[], object]] = {}
    for kind in ("loss", "train"):
        for who, h in harness.items():
            fns[f"{who} {kind}"] = functools.partial(h.loss if kind == "loss" else h.train, pairs)
    return fns


def run_workload(wl: W.Workload, cfg: ModernDecoderConfig, rounds: int) -> list[dict[str, Any]]:
    """Measure one workload; one dict per table row."""
    harness, pairs, diff = setup(wl, cfg)
    times = W.best_times(path_fns(harness, pairs), rounds)
    rows = [
        ("loss-only", "loss", "hf"),
        ("loss-only, hf previous default", "loss", "prev"),
        ("train step", "train", "hf"),
        ("train step, hf previous default", "train", "prev"),
    ]
    hb = harness["bi"]
    return [
        {
            "workload": wl.name, "path": path, "pairs": len(pairs),
            "layouts": (layout(hb, kind == "train"), layout(harness[who], kind == "train")),
            "builtin": times[f"bi {kind}"], "hf": times[f"{who} {kind}"], "diff": diff,
        }
        for path, kind, who in rows
    ]  # fmt: skip


def profile(wl: W.Workload, cfg: ModernDecoderConfig, top: int = 16) -> str:
    """torch.profiler self CPU time and call count per op, one call of every path (after a
    warm-up call): where the HF model spends its time next to the built-in one."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    harness, pairs, _ = setup(wl, cfg)
    stats: dict[str, dict[str, tuple[float, int]]] = {}
    for name, fn in path_fns(harness, pairs).items():
        fn()
        with run_profiler(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        stats[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    ops = sorted({op for s in stats.values() for op in s},
                 key=lambda op: -max(s.get(op, (0.0, 0))[0] for s in stats.values()))  # fmt: skip
    lines = ["| op | " + " | ".join(stats) + " |", "|---|" + "---:|" * len(stats)]
    for op in ops[:top]:
        cells = [f"{s[op][0]:,.0f} ({s[op][1]})" if op in s else "–" for s in stats.values()]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    totals = [f"{sum(t for t, _ in s.values()):,.0f} ({sum(c for _, c in s.values())})"
              for s in stats.values()]  # fmt: skip
    lines.append("| all ops | " + " | ".join(totals) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | path | layout builtin / hf | builtin pairs/s | hf pairs/s | hf ÷ builtin "
        "(best) | hf ÷ builtin (median of rounds) | ≥ 0.9 |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        bi, hf = W.summary(r["builtin"]), W.summary(r["hf"])
        # best of each side, and the median of the per-round ratios (each round runs both
        # paths back to back, so a ratio sees one load level: robust when the load drifts)
        paired = statistics.median(b / h for b, h in zip(r["builtin"], r["hf"], strict=True))
        ratio = bi[0] / hf[0]
        target = "–" if "previous" in r["path"] else ("yes" if ratio >= TARGET else "**no**")
        lines.append(
            f"| {r['workload']} | {r['path']} | {' / '.join(r['layouts'])} | "
            f"{r['pairs'] / bi[0]:.2f} | {r['pairs'] / hf[0]:.2f} | {ratio:.2f} | {paired:.2f} | "
            f"{target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round per workload")
    ap.add_argument("--smoke", action="store_true", help="tiny model, proves the script works")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    ap.add_argument("--kv-heads", type=int, default=2, help="KV heads of both models (GQA)")
    ap.add_argument("--profile", metavar="WORKLOAD",
                    help="print a torch.profiler op table of every path on WORKLOAD instead")  # fmt: skip
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help="comma-separated subset of: " + ", ".join(W.WORKLOADS))  # fmt: skip
    args = ap.parse_args(argv)
    # As bench/run.py: flush denormals before any torch thread starts (every path alike).
    torch.set_flush_denormal(True)
    rounds = args.rounds or (1 if args.quick or args.smoke else 3)
    base, table_ = (
        (W.SMOKE_MODEL, W.SMOKE_WORKLOADS) if args.smoke else (W.BENCH_MODEL, W.WORKLOADS)
    )
    cfg = replace(base, n_kv_heads=args.kv_heads)
    names = ["trl"] if args.smoke else args.workloads.split(",")
    if args.profile:
        print(f"### profile: {args.profile}, self CPU ms (calls) of one call per path\n")
        print(profile(table_[args.profile], cfg))
        return 0
    info = W.machine()
    rows: list[dict[str, Any]] = []
    for name in names:
        print(f"{name}: {rounds} round(s)", file=sys.stderr, flush=True)
        rows += run_workload(table_[name], cfg, rounds)
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    print("## Hugging Face vs built-in model (`make bench-hf`)\n")
    print(f"Both models: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.n_kv_heads} KV heads (GQA), SwiGLU {cfg.ffn_dim}, vocabulary {cfg.vocab_size}, "
          f"untied head, the same weights (largest log-prob difference "
          f"{max(r['diff'] for r in rows):.1e}). Best of {rounds} interleaved round(s).\n")  # fmt: skip
    print("| machine | |\n|---|---|")
    for key, value in info.items():
        print(f"| {key} | {value} |")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
